"""A step's rollouts as data: scored groups, what the step-inputs log keeps, what a loss trains on.

A rollout is one sampled completion of a prompt: its tokens, the sampler's log-probabilities,
how it ended, the snapshot that produced it and its reward. A group is one prompt's G rollouts
with their advantages and whether the constant-reward filter kept it. `StepRollouts` is the
whole input of one RL step, a pydantic model so that it goes to the durable step-inputs log as
JSON and comes back unchanged: a replayed step trains on exactly what the lost one sampled.
`training_batch` turns the accepted groups into datums and the `RLBatch` a loss reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from tinker import types

from algorithms.advantages import AdvantageNorm, group_advantages, is_constant_reward_group
from algorithms.datums import datum_from_tokens
from algorithms.rl_inputs import RLBatch, RLSample
from algorithms.rollout_metrics import RolloutGroup, RolloutSample

__all__ = [
    "Rollout",
    "RowRollouts",
    "StepRollouts",
    "TrainingBatch",
    "score_group",
    "training_batch",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Rollout(_Frozen):
    """One sampled completion: its token ids (the stop token included when one ended it), one
    sampler log-prob per token, the finish reason, the producing snapshot, and its reward."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    snapshot: str | None = None
    reward: float


class RowRollouts(_Frozen):
    """One prompt row's group: its rollouts and advantages (in sample order), whether the
    filter kept it, and `failure` (why sampling failed; then no rollouts) when it was dropped."""

    row: int = Field(ge=0)
    rollouts: list[Rollout] = []
    advantages: list[float] = []
    accepted: bool = False
    failure: str | None = None

    @property
    def rewards(self) -> list[float]:
        return [rollout.reward for rollout in self.rollouts]


class StepRollouts(_Frozen):
    """Everything one RL step trains on, in row order: the rows consumed (accepted, filtered
    and failed), and the data cursor after them."""

    step: int = Field(ge=0)
    rows: list[RowRollouts]
    cursor_after: int = Field(ge=0)
    epoch: int = Field(ge=0)

    @property
    def row_indices(self) -> tuple[int, ...]:
        return tuple(row.row for row in self.rows)

    @property
    def sample_fails(self) -> int:
        return sum(row.failure is not None for row in self.rows)

    def metric_groups(self) -> list[RolloutGroup]:
        """The sampled groups as `rollout_metrics` reads them (failed rows are only counted)."""
        return [
            RolloutGroup(
                [
                    RolloutSample(r.reward, len(r.tokens), r.finish_reason, r.logprobs)
                    for r in row.rollouts
                ],
                accepted=row.accepted,
            )
            for row in self.rows
            if row.failure is None
        ]


def score_group(
    row: int,
    rollouts: Sequence[Rollout],
    *,
    advantage_norm: AdvantageNorm,
    filter_constant: bool,
) -> RowRollouts:
    """A row's scored group: advantages from its rewards, and whether it trains.

    A group whose rewards are all equal has zero advantages everywhere; with `filter_constant`
    it is kept out of the batch (it would add tokens to the mean and no signal).
    """
    rewards = [rollout.reward for rollout in rollouts]
    advantages = group_advantages(rewards, advantage_norm)
    accepted = not (filter_constant and is_constant_reward_group(rewards))
    return RowRollouts(row=row, rollouts=list(rollouts), advantages=advantages, accepted=accepted)


@dataclass(frozen=True)
class TrainingBatch:
    """The datums of a step's accepted rollouts and, in the same order, their RL samples."""

    datums: list[types.Datum]
    batch: RLBatch | None  # None: nothing to train on (every group filtered or failed)


def training_batch(step: StepRollouts, prompts: Sequence[Sequence[int]]) -> TrainingBatch:
    """Datums `prompt + completion` (input `[:-1]`, targets `[1:]`) of every rollout of the
    accepted groups, and per datum an `RLSample`: mask m = 1 on the targets that are
    completion tokens, the sampler log-probs on them, the group's advantage.

    `prompts[row]` are the rendered prompt ids of dataset row `row`. A rollout without tokens
    (nothing was generated) has no target to train and is left out.
    """
    datums: list[types.Datum] = []
    samples: list[RLSample] = []
    for group in step.rows:
        if not group.accepted:
            continue
        prompt = list(prompts[group.row])
        for rollout, advantage in zip(group.rollouts, group.advantages, strict=True):
            if not rollout.tokens:
                continue
            if len(rollout.logprobs) != len(rollout.tokens):
                raise ValueError(
                    f"row {group.row}: {len(rollout.logprobs)} sampler log-probs for "
                    f"{len(rollout.tokens)} completion tokens"
                )
            tokens = prompt + rollout.tokens
            prompt_targets = len(prompt) - 1  # targets before the first completion token
            mask = [0.0] * prompt_targets + [1.0] * len(rollout.tokens)
            datums.append(datum_from_tokens(tokens, [0.0, *mask]))
            sampler = [0.0] * prompt_targets + list(rollout.logprobs)
            samples.append(RLSample(mask, sampler, advantage))
    return TrainingBatch(datums=datums, batch=RLBatch(tuple(samples)) if samples else None)
