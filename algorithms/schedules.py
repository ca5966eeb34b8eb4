"""Learning-rate schedules as pure functions of the step (`lr_schedule`).

The learning rate of step `t` depends on nothing but `t` and the config, so a run resumed at
step `t` uses exactly the rates of an uninterrupted one; no scheduler
object carries state across a checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["constant", "linear", "cosine"]


def learning_rate_at(
    step: int,
    *,
    peak: float,
    total_steps: int,
    schedule: LRSchedule = "constant",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate of 0-based optimizer step `step`.

    With `min_lr = peak * min_lr_ratio`: warmup rises linearly from `min_lr` to `peak` over
    `warmup_steps` (`min_lr + (peak - min_lr) * step / warmup_steps`); then, with
    `t = step - warmup_steps` and `T = total_steps - warmup_steps`,
    constant: `peak`; linear: `peak - (peak - min_lr) * t / T`;
    cosine: `min_lr + ½ (peak - min_lr) (1 + cos(π t / T))`.
    """
    if step < 0 or total_steps <= 0:
        raise ValueError(f"need step >= 0 and total_steps > 0, got {step=} {total_steps=}")
    if not 0.0 <= min_lr_ratio <= 1.0 or warmup_steps < 0:
        raise ValueError(f"need 0 <= min_lr_ratio <= 1 and warmup_steps >= 0, got {min_lr_ratio=}")
    min_lr = peak * min_lr_ratio
    if step < warmup_steps:
        return min_lr + (peak - min_lr) * step / warmup_steps
    if schedule == "constant":
        return peak
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "linear":
        return peak - (peak - min_lr) * progress
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
