"""The `rollout/*` metrics of one RL step, from its sampled groups: pure, so testable by hand.

A group is one prompt's G completions. The step's groups are those that came back from the
sampler (accepted by the constant-reward filter or not); rows whose sampling failed are only
counted. `rollout/reward` is over the accepted groups (what trains), `raw_reward`, `accuracy`
and `pass@k` over every sampled group (what the policy does).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from algorithms.advantages import pass_at_k
from algorithms.rewards import is_correct

__all__ = ["RolloutGroup", "RolloutSample", "rollout_metrics"]


@dataclass(frozen=True)
class RolloutSample:
    """One completion: its reward, length, the sampler's finish reason and token log-probs."""

    reward: float
    completion_len: int
    finish_reason: str  # "stop", or "length" when the token limit cut it
    sampler_logprobs: Sequence[float] | None = None  # one per completion token, when returned


@dataclass(frozen=True)
class RolloutGroup:
    """One prompt's completions, and whether the constant-reward filter kept the group."""

    samples: Sequence[RolloutSample]
    accepted: bool = True


def rollout_metrics(
    groups: Sequence[RolloutGroup], *, sample_fails: int = 0, pass_k: Sequence[int] = ()
) -> dict[str, float]:
    """The `rollout/*` metrics of one step.

    `sample_fails` counts rows dropped because sampling failed. `pass_k` lists the k of the
    `rollout/pass@k` estimates (unbiased, c = completions with reward > 0.5), averaged over the
    groups with at least k completions. A metric with nothing to average over is left out
    (no accepted group: no `reward`; no log-probs: no `entropy`), never reported as 0.
    """
    samples = [sample for group in groups for sample in group.samples]
    accepted = [group for group in groups if group.accepted]
    metrics: dict[str, float] = {
        "rollout/samples_completed": float(len(samples)),
        "rollout/total_sampled": float(len(groups)),
        "rollout/valid_prompt_groups": float(len(accepted)),
        "rollout/sample_fails": float(sample_fails),
    }
    if groups:
        metrics["rollout/filter_reject_ratio"] = 1.0 - len(accepted) / len(groups)
    accepted_rewards = [sample.reward for group in accepted for sample in group.samples]
    if accepted_rewards:
        metrics["rollout/reward"] = statistics.fmean(accepted_rewards)
    if samples:
        metrics.update(_sample_metrics(samples))
    for k in pass_k:
        estimates = [_group_pass_at_k(group, k) for group in groups if len(group.samples) >= k]
        if estimates:
            metrics[f"rollout/pass@{k}"] = statistics.fmean(estimates)
    return metrics


def _sample_metrics(samples: Sequence[RolloutSample]) -> dict[str, float]:
    """Reward, accuracy, lengths, truncation and entropy over every completion."""
    lengths = [sample.completion_len for sample in samples]
    metrics = {
        "rollout/raw_reward": statistics.fmean(sample.reward for sample in samples),
        "rollout/accuracy": sum(is_correct(s.reward) for s in samples) / len(samples),
        "rollout/response_len/mean": statistics.fmean(lengths),
        "rollout/response_len/median": float(statistics.median(lengths)),
        "rollout/response_len/max": float(max(lengths)),
        "rollout/response_len/min": float(min(lengths)),
        "rollout/truncated_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }
    # Entropy estimate: the mean of -log p over sampled completion tokens (a token-level mean).
    logprobs = [lp for s in samples if s.sampler_logprobs is not None for lp in s.sampler_logprobs]
    if logprobs:
        metrics["rollout/entropy"] = -statistics.fmean(logprobs)
    return metrics


def _group_pass_at_k(group: RolloutGroup, k: int) -> float:
    correct = sum(is_correct(sample.reward) for sample in group.samples)
    return pass_at_k(len(group.samples), correct, k)
