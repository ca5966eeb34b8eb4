"""Evaluation at a cadence point: one task run, and greedy completions from the deployment.

`evaluate_point` is the task the Prefect UI shows for an evaluation: it runs the recipe's
evaluation of the weights after a point (a forward pass on the trainer, samples from the
deployment, a hotload first when needed), whose SDK operations are plain functions inside it,
so a point costs one task run rather than one per operation (Prefect's server spends tens of
milliseconds of CPU on each). It is not retried: the forward pass shares the training client's
ordered session; the SDK retries transient HTTP failures, and a failed evaluation fails the
attempt, whose retry evaluates again (the ledger has no row for it). `sample_greedy` samples
only after the weights to evaluate were hotloaded *and verified*, so it never reads stale
weights; scoring is the flow's business (`algorithms/`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from sdk import DeploymentSampler, SampledCompletion
from tasks.policy import SHORT_TIMEOUT_S

__all__ = ["evaluate_point", "greedy_completions", "sample_greedy"]


async def greedy_completions(
    sampler: DeploymentSampler, prompts: Sequence[Sequence[int]], max_tokens: int, timeout_s: float
) -> list[list[int]]:
    async def one(prompt: Sequence[int]) -> list[int]:
        samples: list[SampledCompletion] = await sampler.sample_with_prompt_tokens(
            prompt, n=1, max_tokens=max_tokens, temperature=0.0, http_timeout=timeout_s
        )
        return samples[0].completion_tokens if samples else []

    try:
        return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))
    finally:
        await sampler.aclose()  # its connections belong to this event loop


@task(
    name="evaluate",
    task_run_name="evaluate step {point}",
    retries=0,  # a forward pass on the training client's ordered session
    cache_policy=NO_CACHE,  # holds the live clients
    timeout_seconds=SHORT_TIMEOUT_S * 3,  # a hotload, a forward pass and sampling
)
def evaluate_point(evaluate: Callable[[int], Mapping[str, float]], point: int) -> dict[str, float]:
    """The metrics of the recipe's `evaluate` at `point` (empty: nothing to report)."""
    return dict(evaluate(point))


def sample_greedy(
    sampler: DeploymentSampler,
    prompts: Sequence[Sequence[int]],
    step: int,
    max_tokens: int,
    timeout_s: float,
) -> list[list[int]]:
    """One greedy (temperature 0) completion per prompt, in order: its token ids (`step`:
    the point evaluated, for the caller's reading)."""
    return asyncio.run(greedy_completions(sampler, prompts, max_tokens, timeout_s))
