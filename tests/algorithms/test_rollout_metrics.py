"""The rollout/* metrics of one step, checked against values worked out by hand."""

from __future__ import annotations

import pytest

from algorithms.rollout_metrics import RolloutGroup, RolloutSample, rollout_metrics


def _sample(
    reward: float, length: int, finish: str = "stop", lps: list[float] | None = None
) -> RolloutSample:
    return RolloutSample(reward, length, finish, lps)


# Two groups of 3. The first mixed (kept by the filter), the second constant (rejected).
MIXED = RolloutGroup(
    [_sample(1.0, 2, lps=[-0.5, -1.5]), _sample(0.0, 4, "length"), _sample(0.6, 3, lps=[-1.0] * 3)]
)
CONSTANT = RolloutGroup([_sample(0.0, 1), _sample(0.0, 9, "length"), _sample(0.0, 5)], False)


def test_the_metrics_of_a_step_by_hand() -> None:
    metrics = rollout_metrics([MIXED, CONSTANT], sample_fails=2, pass_k=(1, 2, 3, 4))
    assert metrics == pytest.approx(
        {
            "rollout/samples_completed": 6.0,
            "rollout/total_sampled": 2.0,
            "rollout/valid_prompt_groups": 1.0,
            "rollout/sample_fails": 2.0,
            "rollout/filter_reject_ratio": 0.5,
            "rollout/reward": 1.6 / 3,  # the kept group only
            "rollout/raw_reward": 1.6 / 6,  # every sampled group
            "rollout/accuracy": 2 / 6,  # 1.0 and 0.6 are above one half
            "rollout/response_len/mean": 24 / 6,
            "rollout/response_len/median": 3.5,
            "rollout/response_len/max": 9.0,
            "rollout/response_len/min": 1.0,
            "rollout/truncated_ratio": 2 / 6,
            "rollout/entropy": 5.0 / 5,  # -mean of the 5 returned token log-probs
            # Mixed group n=3, c=2: pass@1 = 2/3, pass@2 = 1 - C(1,2)/C(3,2) = 1; constant: 0.
            "rollout/pass@1": (2 / 3 + 0) / 2,
            "rollout/pass@2": (1.0 + 0) / 2,
            "rollout/pass@3": (1.0 + 0) / 2,
        }
    )
    assert "rollout/pass@4" not in metrics  # no group has 4 completions


def test_pass_at_k_is_the_unbiased_estimate() -> None:
    # n = 4, c = 1: pass@2 = 1 - C(3, 2) / C(4, 2) = 1 - 3/6.
    group = RolloutGroup([_sample(1.0, 1)] + [_sample(0.0, 1)] * 3)
    assert rollout_metrics([group], pass_k=(2,))["rollout/pass@2"] == pytest.approx(0.5)


def test_metrics_with_nothing_to_average_are_left_out() -> None:
    assert rollout_metrics([], sample_fails=3) == {
        "rollout/samples_completed": 0.0,
        "rollout/total_sampled": 0.0,
        "rollout/valid_prompt_groups": 0.0,
        "rollout/sample_fails": 3.0,
    }
    rejected_only = rollout_metrics([CONSTANT])
    assert "rollout/reward" not in rejected_only and "rollout/entropy" not in rejected_only
    assert rejected_only["rollout/filter_reject_ratio"] == 1.0
    assert rejected_only["rollout/raw_reward"] == 0.0
