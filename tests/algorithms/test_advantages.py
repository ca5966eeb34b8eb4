"""Group advantages, the constant-group filter and pass@k, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from algorithms.advantages import (
    constant_reward_groups,
    group_advantages,
    is_constant_reward_group,
    mean_center,
    pass_at_k,
    zscore,
)


def test_zscore_uses_the_unbiased_std() -> None:
    # mean 2, deviations -1, 0, 1 -> unbiased std sqrt(2 / 2) = 1
    assert zscore([1.0, 2.0, 3.0]) == pytest.approx([-1.0 / (1 + 1e-8), 0.0, 1.0 / (1 + 1e-8)])
    # mean 0.5, deviations ±0.5 -> unbiased std sqrt(4 * 0.25 / 3)
    std = math.sqrt(1.0 / 3.0)
    assert zscore([0.0, 1.0, 0.0, 1.0]) == pytest.approx(
        [-0.5 / std, 0.5 / std, -0.5 / std, 0.5 / std]
    )


def test_a_constant_group_gets_zero_advantages() -> None:
    assert zscore([0.7, 0.7, 0.7]) == [0.0, 0.0, 0.0]
    assert mean_center([0.7, 0.7]) == [0.0, 0.0]


def test_a_nearly_constant_group_is_not_blown_up() -> None:
    # std 5e-10 < 1e-8 counts as 1, so the advantages stay as small as the deviations
    advantages = zscore([1.0, 1.0 + 1e-9])
    assert max(abs(a) for a in advantages) < 1e-8


def test_zscore_refuses_a_group_of_one_naming_the_field() -> None:
    with pytest.raises(ValueError, match="completions_per_prompt"):
        zscore([1.0])
    with pytest.raises(ValueError, match="completions_per_prompt"):
        group_advantages([1.0], "zscore")


def test_mean_center_keeps_the_scale() -> None:
    assert mean_center([0.0, 1.0, 1.0, 2.0]) == [-1.0, 0.0, 0.0, 1.0]
    assert group_advantages([3.0], "mean_center") == [0.0]


def test_bad_rewards_and_norms_are_named() -> None:
    with pytest.raises(ValueError, match=r"rewards\[1\] is not finite"):
        zscore([1.0, math.nan])
    with pytest.raises(ValueError, match="empty"):
        mean_center([])
    with pytest.raises(ValueError, match="advantage_norm"):
        group_advantages([1.0, 2.0], "rank")  # type: ignore[arg-type]


def test_constant_reward_groups_are_the_ones_the_filter_drops() -> None:
    groups = [[1.0, 1.0], [0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 1e-6]]
    assert constant_reward_groups(groups) == [0, 2]
    assert is_constant_reward_group([2.0]) and not is_constant_reward_group([2.0, 2.5])


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 0, 1, 0.0),
        (4, 4, 2, 1.0),
        (4, 1, 1, 0.25),
        (4, 1, 2, 1 - math.comb(3, 2) / math.comb(4, 2)),  # 0.5
        (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
        (5, 3, 3, 1.0),  # fewer than k wrong answers: every k-subset holds a right one
    ],
)
def test_pass_at_k_is_the_unbiased_estimate(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c=5"):
        pass_at_k(4, 5, 1)
