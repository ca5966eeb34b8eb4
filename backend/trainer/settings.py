"""Typed settings of a training run: LoRA shape, AdamW hyper-parameters, step options.

Field names match the tinker 0.23 wire (`LoraConfig`, `AdamParams`) so the protocol layer maps
JSON to these models one to one; pydantic's `ValidationError` is a `ValueError`, reported as a
user error like `UserError`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GradNormalization = Literal["num_loss_tokens", "num_sequences", "none"]
CheckpointType = Literal["base", "delta", "merged_base"]

# lora_alpha when the request has none (fireloop choice: the SDK's explicit default).
DEFAULT_LORA_ALPHA = 32
# No useful run steps with more: larger values only blow the weights up.
MAX_LEARNING_RATE = 10.0
# Decoupled decay multiplies weights by (1 - lr·wd); beyond 1 it is no longer a decay.
MAX_WEIGHT_DECAY = 1.0
# torch.manual_seed takes a signed 64-bit value.
MAX_SEED = 2**63 - 1


class LoraSettings(BaseModel):
    """A LoRA adapter over the base model (tinker `LoraConfig` plus Firetitan `alpha`).

    `seed` seeds the adapter initialisation; tinker's "no seed" maps to 0 so runs are
    reproducible by default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(gt=0)
    alpha: int = Field(default=DEFAULT_LORA_ALPHA, gt=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class AdamSettings(BaseModel):
    """AdamW hyper-parameters of one `optim_step` (tinker `AdamParams`, same names and defaults).

    Bounded as well as typed: NaN, infinities, a negative or absurd learning rate (> 10), betas
    outside [0, 1) or a non-positive eps are refused before they can reach the weights.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(default=1e-4, ge=0, le=MAX_LEARNING_RATE)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0, le=MAX_WEIGHT_DECAY)
    # 0 disables clipping.
    grad_clip_norm: float = Field(default=0.0, ge=0)
