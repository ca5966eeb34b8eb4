"""Sampling RL rollouts from the deployment: G seeded completions per prompt, with log-probs.

Each completion is its own request with its own seed, so a row's samples are independent
draws and the same (seed, row, sample) asks the server for the same stream. A row whose
sampling fails after the sampler's own retries (hotload 425/404, 429 and 5xx are retried there)
comes back with the failure instead of completions: the step drops and counts it, it never
trains on a partial group. Sampling changes nothing on the server, so the task itself may retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from sdk import DeploymentSampler, FireworksError, SampledCompletion
from tasks.policy import SHORT_TIMEOUT_S, TASK_RETRIES, TASK_RETRY_DELAYS, retry_transient

__all__ = ["RowRequest", "SampledRow", "sample_rollouts", "sample_row"]


class RowRequest(BaseModel):
    """One prompt row to sample: its position in the row stream, its prompt ids, one seed
    per completion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    row: int
    prompt: list[int]
    seeds: list[int]


class SampledRow(BaseModel):
    """A row's completions in seed order, or why its sampling failed (then none)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: RowRequest
    completions: list[SampledCompletion] = []
    failure: str | None = None


async def sample_row(
    sampler: DeploymentSampler,
    request: RowRequest,
    *,
    max_tokens: int,
    temperature: float,
    timeout_s: float,
    hotload_retry_interval_s: float = 5.0,
) -> SampledRow:
    """All of a row's completions, or its failure: a sampling error, or fewer completions than
    seeds (the sampler drops a completion that does not fit). A request that meets a hotload
    in progress is retried every `hotload_retry_interval_s` (the sampler's default is 5 s;
    a producer sampling alongside hotloads wants less)."""

    async def one(seed: int) -> list[SampledCompletion]:
        return await sampler.sample_with_prompt_tokens(
            request.prompt,
            n=1,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            logprobs=True,
            http_timeout=timeout_s,
            hotload_retry_interval=hotload_retry_interval_s,
            hotload_max_retries=max(10, int(timeout_s / hotload_retry_interval_s)),
        )

    try:
        drawn = await asyncio.gather(*(one(seed) for seed in request.seeds))
    except FireworksError as exc:  # the SDK's typed failures, after its retries
        return SampledRow(request=request, failure=f"{type(exc).__name__}: {exc}")
    completions = [completion for samples in drawn for completion in samples]
    if len(completions) != len(request.seeds):
        failure = f"{len(completions)} of {len(request.seeds)} completions came back"
        return SampledRow(request=request, failure=failure)
    return SampledRow(request=request, completions=completions)


async def _sample_all(
    sampler: DeploymentSampler,
    requests: Sequence[RowRequest],
    max_tokens: int,
    temperature: float,
    timeout_s: float,
) -> list[SampledRow]:
    try:
        return list(
            await asyncio.gather(
                *(
                    sample_row(
                        sampler,
                        request,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        timeout_s=timeout_s,
                    )
                    for request in requests
                )
            )
        )
    finally:
        await sampler.aclose()  # its connections belong to this event loop


@task(
    name="sample-rollouts",
    task_run_name="sample rollouts for step {step}",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,  # holds the live sampler
    timeout_seconds=SHORT_TIMEOUT_S,
)
def sample_rollouts(
    sampler: DeploymentSampler,
    requests: Sequence[RowRequest],
    step: int,
    max_tokens: int,
    temperature: float,
    timeout_s: float,
) -> list[SampledRow]:
    """Every request's completions (or failure), in request order, sampled concurrently."""
    return asyncio.run(_sample_all(sampler, requests, max_tokens, temperature, timeout_s))
