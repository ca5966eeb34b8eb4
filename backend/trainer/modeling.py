"""The torch modules behind a training run: load the HF model, attach LoRA, extract full weights.

Kept apart from the engine so the narrow casts that transformers and peft need live in one
place. Weights are fp32 masters on every device; CUDA adds bf16 autocast in the forward pass.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from backend.models.loading import model_construction
from backend.trainer.errors import UserError
from backend.trainer.export import Tensors, dtype_name
from backend.trainer.settings import LoraSettings

# LoRA target modules of Llama/Qwen-style models: all attention and MLP projections.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULE = "lm_head"


def load_hf_model(model_dir: Path, device: torch.device) -> PreTrainedModel:
    """The HF causal LM of `model_dir` in fp32 on `device`."""
    with model_construction():
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return cast(PreTrainedModel, cast(torch.nn.Module, loaded).to(device))


def lora_target_modules(model: PreTrainedModel, lora: LoraSettings) -> list[str]:
    """Module names to adapt; `lm_head` only when untied (else LoRA would shift the inputs too)."""
    targets = [*(ATTN_MODULES if lora.train_attn else ()), *(MLP_MODULES if lora.train_mlp else ())]
    get_output_embeddings = cast(Callable[[], torch.nn.Module | None], model.get_output_embeddings)
    output_embeddings = get_output_embeddings()
    tied = output_embeddings is not None and (
        output_embeddings.weight is model.get_input_embeddings().weight
    )
    if lora.train_unembed and not tied:
        targets.append(UNEMBED_MODULE)
    if not targets:
        raise UserError("lora_config trains nothing: enable train_attn, train_mlp or train_unembed")
    return targets


def attach_lora(model: PreTrainedModel, lora: LoraSettings) -> torch.nn.Module:
    """Wrap `model` in a PEFT LoRA adapter; the init is seeded and leaves the global RNG alone."""
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=lora_target_modules(model, lora),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        return cast(torch.nn.Module, get_peft_model(model, config))


def full_tensors(
    module: torch.nn.Module,
    dtype: torch.dtype,
    *,
    merge_lora: bool,
    into: Mapping[str, torch.Tensor] | None = None,
) -> Tensors:
    """Full HF weights of `module` in `dtype` on the CPU, copied; tied tensors stored once.

    With `merge_lora`, a copy of the PEFT model has its adapter folded into the base weights
    (the live model keeps training unmerged: merge then unmerge is not bit-exact).
    `into` offers CPU tensors (an earlier result, whatever they hold now) to copy into where
    a name's dtype and shape match: writing over memory already touched is much cheaper
    than faulting in a fresh model-sized allocation at every save.
    """
    if merge_lora:
        module = cast(PeftModel, copy.deepcopy(module)).merge_and_unload()
    spare = into or {}
    tensors: Tensors = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # a tied weight (lm_head = embed_tokens): HF re-ties it on load
        seen.add(tensor.data_ptr())
        out = spare.get(name)
        if out is not None and _reusable(out, tensor, dtype):
            tensors[name] = out.copy_(tensor.detach())
        else:
            tensors[name] = tensor.detach().to("cpu", dtype, copy=True).contiguous()
    return tensors


def _reusable(out: torch.Tensor, tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        out.dtype == dtype
        and out.shape == tensor.shape
        and out.device.type == "cpu"
        and out.is_contiguous()
        and out.data_ptr() != tensor.data_ptr()
    )


def config_json(model: PreTrainedModel, dtype: torch.dtype) -> str:
    """The model's `config.json` text, declaring `dtype` as the weights' dtype."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype_name(dtype)
    return config.to_json_string()


def save_adapter(model: torch.nn.Module, directory: Path) -> None:
    """The PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) of a LoRA model."""
    cast(PeftModel, model).save_pretrained(str(directory))
    # peft also writes a model card; a snapshot carries weights and config only.
    (directory / "README.md").unlink(missing_ok=True)


def read_adapter(
    directory: Path, lora: LoraSettings, trainable: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weights of an HF PEFT adapter directory, keyed like `trainable`.

    The adapter must have this model's rank, alpha and adapted modules: its weights are only
    meaningful with the scaling and targets they were trained with.
    """
    config_path = directory / "adapter_config.json"
    weights_path = directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(
            f"adapter_path {directory} needs adapter_config.json and adapter_model.safetensors"
        )
    try:
        config = json.loads(config_path.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"adapter_path {directory}: unreadable adapter_config.json ({exc})"
        ) from exc
    if (rank, alpha) != (lora.rank, float(lora.alpha)):
        raise UserError(
            f"adapter {directory} has LoRA rank {rank}, alpha {alpha:g}; "
            f"this model has rank {lora.rank}, alpha {lora.alpha}"
        )
    # peft saves keys without the adapter name: `lora_A.weight` for `lora_A.default.weight`.
    saved = load_file(weights_path)
    by_saved_name = {name.replace(".default.", "."): name for name in trainable}
    if saved.keys() != by_saved_name.keys():
        differing = sorted(saved.keys() ^ by_saved_name.keys())[:3]
        raise UserError(f"adapter {directory} adapts other modules than this model: {differing}")
    weights = {by_saved_name[key]: tensor for key, tensor in saved.items()}
    for name, tensor in weights.items():
        if tensor.shape != trainable[name].shape:
            raise UserError(f"adapter {directory}: {name} has shape {list(tensor.shape)}")
    return weights


def decoder_and_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (returns `last_hidden_state`) and the output head of `model`; after
    `attach_lora` both already carry the adapter layers, which peft injects in place."""
    head = cast(Callable[[], torch.nn.Module | None], model.get_output_embeddings)()
    if head is None:
        raise UserError(f"model type {model.config.model_type!r} has no output head to chunk")
    return _decoder(model), head


def compile_decoder(model: PreTrainedModel) -> None:
    """torch.compile the decoder stack in place (same parameters, same state_dict keys);
    dynamic shapes, since every request brings its own batch and sequence lengths."""
    _decoder(model).compile(dynamic=True)


def _decoder(model: PreTrainedModel) -> torch.nn.Module:
    get_decoder = cast(Callable[[], torch.nn.Module], model.get_decoder)
    return get_decoder()
