"""Sample-based evaluation: greedy completions of the eval prompts from the deployment.

Sampling is idempotent (nothing changes on the server), so the task retries transient
failures; it runs only after the weights to evaluate were hotloaded *and verified*, so it never
reads stale weights. Scoring is the flow's business (`algorithms/`): this
task is the one SDK operation, and returns the completion token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from sdk import DeploymentSampler, SampledCompletion
from tasks.policy import SHORT_TIMEOUT_S, TASK_RETRIES, TASK_RETRY_DELAYS, retry_transient

__all__ = ["greedy_completions", "sample_greedy"]


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
    name="sample-eval",
    task_run_name="sample eval at step {step}",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,  # holds the live sampler
    timeout_seconds=SHORT_TIMEOUT_S,
)
def sample_greedy(
    sampler: DeploymentSampler,
    prompts: Sequence[Sequence[int]],
    step: int,
    max_tokens: int,
    timeout_s: float,
) -> list[list[int]]:
    """One greedy (temperature 0) completion per prompt, in order: its token ids."""
    return asyncio.run(greedy_completions(sampler, prompts, max_tokens, timeout_s))
