"""Typed settings of a training run: LoRA shape, AdamW hyper-parameters, step options.

Field names match the tinker 0.23 wire (`LoraConfig`, `AdamParams`) so the protocol layer maps
JSON to these models one to one; pydantic's `ValidationError` is a `ValueError`, reported as a
user error like `UserError`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


AutocastSetting = Literal["auto", "off", "bf16"]
OptimizerSetting = Literal["auto", "fused", "foreach", "single_tensor"]
# Sequence positions per log-softmax chunk on CUDA when `logprob_chunk` is `auto`: with
# Qwen3's 151k vocabulary, 8 sequences x 256 positions is a 1.2 GB fp32 chunk, not 10 GB.
AUTO_CUDA_LOGPROB_CHUNK = 256


class EngineSettings(BaseModel):
    """How the trainer computes a step (the same math, other kernels); `auto` picks per device.

    `auto` keeps the reference path on CPU (fp32, single-tensor AdamW, one full log-softmax,
    one loss call per datum: what CPU tests and recovery comparisons pin bit for bit) and
    selects the fast path on CUDA: bf16 autocast over fp32 master weights, fused AdamW, the
    log-softmax in chunks of `AUTO_CUDA_LOGPROB_CHUNK` positions, losses for the whole batch.
    `compile` (torch.compile of the decoder) is off unless asked, and CUDA only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Autocast of the forward pass; parameters, gradients and AdamW state stay fp32 either way.
    autocast: AutocastSetting = "auto"
    # AdamW kernel: `fused` (one kernel for all parameters), `foreach` or `single_tensor`.
    optimizer: OptimizerSetting = "auto"
    compile: bool = False
    # Sequence positions per chunk of the vocabulary log-softmax; 0 = one full BxTxV pass.
    logprob_chunk: int | Literal["auto"] = "auto"
    # One loss call over the padded micro-batch instead of one per datum.
    batched_losses: bool | Literal["auto"] = "auto"

    @field_validator("logprob_chunk")
    @classmethod
    def _chunk_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"logprob_chunk must be >= 0 (0 = no chunking), got {value}")
        return value

    @classmethod
    def fast(cls, *, autocast: AutocastSetting = "bf16", logprob_chunk: int = 64) -> EngineSettings:
        """Every fast-path option explicitly on (except compile), on any device."""
        return cls(
            autocast=autocast,
            optimizer="fused",
            logprob_chunk=logprob_chunk,
            batched_losses=True,
        )
