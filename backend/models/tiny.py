"""The `tiny` base model: a random-init Qwen3 built from a config in code.

CI and fault-injection tests need a real causal LM that builds offline in well under a second and
trains fast on two CPU cores; the byte-level vocabulary of 259 keeps the LM head cheap. The build
is deterministic (fixed seed, fixed config), so every machine writes the same weight bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, Qwen3Config

from backend.models.loading import model_construction
from backend.models.registry import ByteChatTemplate
from backend.models.tokenizers import (
    BYTE_VOCAB_SIZE,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    build_byte_tokenizer,
)

logger = logging.getLogger(__name__)

# transformers leaves these entry points unannotated; name the types they return.
_model_from_config = cast(Callable[..., PreTrainedModel], AutoModelForCausalLM.from_config)
_generation_config = cast(Callable[..., GenerationConfig], GenerationConfig)

TINY_CONTEXT_LENGTH: Final = 256
TINY_PARAMETER_COUNT: Final = 328_832


def tiny_config() -> Qwen3Config:
    """The architecture: 2 layers, hidden 128, GQA 4/2 heads of 32, tied embeddings."""
    return Qwen3Config(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=TINY_CONTEXT_LENGTH,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        # Qwen convention: <|endoftext|> doubles as BOS and pad; the tokenizer adds no BOS.
        bos_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        dtype="float32",
    )


def build_tiny(out_dir: Path, *, seed: int = 0, chat_template: ByteChatTemplate = "plain") -> Path:
    """Write the tiny model and its tokenizer into `out_dir` and return it.

    Writes config.json, generation_config.json, model.safetensors and the tokenizer files; the
    same seed gives byte-identical weights. The caller's global RNG state is left untouched.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with model_construction():
            model = _model_from_config(tiny_config(), dtype=torch.float32)
    parameter_count = model.num_parameters()
    if parameter_count != TINY_PARAMETER_COUNT:
        raise AssertionError(
            f"tiny model has {parameter_count} parameters, expected {TINY_PARAMETER_COUNT}"
        )
    model.generation_config = _generation_config(
        bos_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    model.save_pretrained(out_dir)
    build_byte_tokenizer(chat_template, model_max_length=TINY_CONTEXT_LENGTH).save_pretrained(
        out_dir
    )
    logger.info("built tiny model (seed %d, %s template) in %s", seed, chat_template, out_dir)
    return out_dir
