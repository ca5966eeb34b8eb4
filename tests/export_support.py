"""Loading an export the way a user would (plain transformers / peft) and comparing log-probs."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest absolute difference between two lists of per-token log-probabilities."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def hf_model(directory: Path) -> PreTrainedModel:
    """An exported (or base) model directory, in fp32, ready for a forward pass."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def peft_model(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """A PEFT adapter directory on its base model, ready for a forward pass."""
    return PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval()
