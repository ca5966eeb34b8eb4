# ruff: noqa: RUF002  (the docstrings write formulas with math symbols)
"""Group-relative advantages for RL: one reward per completion, G completions per prompt.

`zscore` (the cookbook's default) and `mean_center` (Dr. GRPO: no division by the group's std,
so no length or difficulty bias), the constant-reward group filter (DAPO's dynamic sampling) and
the unbiased pass@k estimate used by evaluation. Plain floats in and out: no torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, Literal

AdvantageNorm = Literal["zscore", "mean_center"]

# Below this the group's std is treated as zero: a constant group gets advantages of 0, not ±inf.
STD_FLOOR: Final = 1e-8


def mean_center(rewards_G: Sequence[float]) -> list[float]:
    """A_i = r_i − mean(r)."""
    if is_constant_reward_group(rewards_G):
        # exactly 0, not the rounding error of the mean
        return [0.0] * len(rewards_G)
    mean = math.fsum(rewards_G) / len(rewards_G)
    return [float(r) - mean for r in rewards_G]


def zscore(rewards_G: Sequence[float]) -> list[float]:
    """A_i = (r_i − mean(r)) / (std(r) + 1e-8), std unbiased (N − 1); std < 1e-8 counts as 1.

    A group of one has no spread to normalise by, so it is refused (naming the config field
    that sets the group size) rather than given a silent advantage of 0.
    """
    _require_rewards(rewards_G)
    if len(rewards_G) < 2:
        raise ValueError(
            "completions_per_prompt must be >= 2 for advantage_norm='zscore' "
            f"(a group of {len(rewards_G)} has no standard deviation)"
        )
    centered_G = mean_center(rewards_G)
    std = math.sqrt(math.fsum(a * a for a in centered_G) / (len(rewards_G) - 1))
    if std < STD_FLOOR:
        std = 1.0
    return [a / (std + STD_FLOOR) for a in centered_G]


def group_advantages(rewards_G: Sequence[float], norm: AdvantageNorm) -> list[float]:
    """The advantages of one group under `advantage_norm`."""
    if norm == "zscore":
        return zscore(rewards_G)
    if norm == "mean_center":
        return mean_center(rewards_G)
    raise ValueError(f"advantage_norm must be 'zscore' or 'mean_center', got {norm!r}")


def is_constant_reward_group(rewards_G: Sequence[float]) -> bool:
    """True when every completion of the group got the same reward (zero advantage everywhere)."""
    _require_rewards(rewards_G)
    return max(rewards_G) == min(rewards_G)


def constant_reward_groups(groups: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the groups whose rewards are all equal: the ones the dynamic filter drops.

    Such a group teaches nothing (every advantage is 0) but would still count tokens in the
    token-mean denominator and dilute the step.
    """
    return [index for index, rewards_G in enumerate(groups) if is_constant_reward_group(rewards_G)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n − c, k) / C(n, k).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which stays exact where the binomials overflow.
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def _require_rewards(rewards_G: Sequence[float]) -> None:
    if len(rewards_G) == 0:
        raise ValueError("a reward group is empty")
    for index, reward in enumerate(rewards_G):
        if not math.isfinite(reward):
            raise ValueError(f"rewards[{index}] is not finite: {reward!r}")
