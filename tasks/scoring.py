"""Scoring sampled rows with a reward: the unit of work the reward and evaluation fan-out ships.

A shard of rows arrives already parsed (the tokenizer stays with the flow), so a worker needs
only the reward and the rows: every completion rewarded (`call_reward` names the row's file and
line when the reward fails), then the group's advantages. Scoring changes nothing anywhere, so
the task may retry a transient failure; a reward that raises is not transient and is not retried.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from algorithms.advantages import AdvantageNorm
from algorithms.chat import ParsedResponse
from algorithms.rewards import Reward, call_reward
from algorithms.rl_data import PromptRow
from algorithms.rl_rollouts import Rollout, RowRollouts, score_group
from tasks.policy import SHORT_TIMEOUT_S, TASK_RETRIES, TASK_RETRY_DELAYS, retry_transient
from tasks.rollouts import SampledRow

__all__ = ["RowToScore", "score_row", "score_rows"]


class RowToScore(BaseModel):
    """A sampled row with its completions parsed, the prompt row the reward reads, and where
    the row comes from (`file:line`) for a reward's error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sampled: SampledRow
    responses: list[ParsedResponse]
    prompt_row: PromptRow
    where: str


def score_row(
    item: RowToScore, reward: Reward, advantage_norm: AdvantageNorm, filter_constant: bool
) -> RowRollouts:
    """The row's rollouts, rewarded, with the group's advantages (or the row's sampling
    failure, unscored)."""
    sampled = item.sampled
    if sampled.failure is not None:
        return RowRollouts(row=sampled.request.row, failure=sampled.failure)
    rollouts = [
        Rollout(
            tokens=completion.completion_tokens,
            logprobs=list(completion.inference_logprobs or []),
            finish_reason=completion.finish_reason,
            snapshot=completion.snapshot_identity,
            reward=call_reward(reward, parsed, item.prompt_row, where=item.where),
        )
        for completion, parsed in zip(sampled.completions, item.responses, strict=True)
    ]
    return score_group(
        sampled.request.row,
        rollouts,
        advantage_norm=advantage_norm,
        filter_constant=filter_constant,
    )


@task(
    name="score-rewards",
    task_run_name="score {purpose} rewards at step {step} part {part}",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,  # a reward function is no cache key
    timeout_seconds=SHORT_TIMEOUT_S,
)
async def score_rows(
    items: Sequence[RowToScore],
    reward: Reward,
    advantage_norm: AdvantageNorm,
    filter_constant: bool,
    purpose: str,
    step: int,
    part: int,
) -> list[RowRollouts]:
    """One shard of a step's rows scored, in order (`purpose` and `part` name the run).

    Async only so that its deadline holds in a runner's worker thread, where Prefect cannot
    time a sync task out (and warns on every run); the rewards themselves are plain calls."""
    return [score_row(item, reward, advantage_norm, filter_constant) for item in items]
