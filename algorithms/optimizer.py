"""The optimizer of every recipe: AdamW settings, the learning rate of each step, normalisation.

`OptimizerPlan` says everything `optim_step` needs for any step as a pure function of the step,
so a resumed run applies exactly the updates an uninterrupted one would. The gradient
normalisation travels with it because it must pair with how the recipe's loss is reduced:
a loss that is already a mean (DPO, ORPO) takes `none`, a server-side weighted sum (SFT's
cross-entropy) takes a count; both or neither scales the gradient wrongly, and silently.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from tinker import types

from algorithms.datums import GradNormalization
from algorithms.schedules import LRSchedule, learning_rate_at

__all__ = ["AdamConfig", "OptimizerPlan"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdamConfig(_Model):
    """AdamW settings besides the learning rate.

    The defaults follow the Fireworks cookbook's, except `grad_clip_norm`, which clips at 1.0
    (tinker's own defaults are `eps=1e-8`, `weight_decay=0`).
    """

    beta1: float = Field(default=0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="Second-moment decay.")
    eps: float = Field(default=1e-12, ge=0, description="Added to the denominator.")
    weight_decay: float = Field(default=0.01, ge=0, description="Decoupled weight decay.")
    grad_clip_norm: float = Field(default=1.0, ge=0, description="0 = no clipping.")


class OptimizerPlan(_Model):
    """Everything `optim_step` needs, for any step: the schedule and the normalisation."""

    peak_lr: float = Field(gt=0)
    total_steps: int = Field(gt=0)
    schedule: LRSchedule = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    adam: AdamConfig = AdamConfig()
    grad_normalization: GradNormalization = "num_loss_tokens"

    def learning_rate(self, step: int) -> float:
        """The rate of 0-based step `step` (`algorithms.schedules.learning_rate_at`)."""
        return learning_rate_at(
            step,
            peak=self.peak_lr,
            total_steps=self.total_steps,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
        )

    def adam_params(self, step: int) -> types.AdamParams:
        return types.AdamParams(learning_rate=self.learning_rate(step), **self.adam.model_dump())
