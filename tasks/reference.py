"""The reference model's log-probabilities: what DPO measures its policy against.

One task run per batch of pairs, so the Prefect UI shows the cache being built batch by batch
and the caller can make each batch durable before it sends the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from algorithms.preference import RenderedPair, pair_datums
from algorithms.preference_losses import logprobs_of, response_logprob_sums
from tasks.errors import trainer_call
from tasks.platform import Waits
from tasks.policy import SHORT_TIMEOUT_S

if TYPE_CHECKING:
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = ["reference_logprob_sums"]


@task(
    name="reference-logprobs",
    task_run_name="reference log-probabilities of {label}",
    retries=0,  # shares the trainer's ordered session with the policy
    cache_policy=NO_CACHE,  # holds the live reference client
    timeout_seconds=SHORT_TIMEOUT_S,
)
def reference_logprob_sums(
    reference: FiretitanTrainingClient,
    pairs: Sequence[RenderedPair],
    label: str,
    job_id: str,
    waits: Waits,
) -> list[tuple[float, float]]:
    """Per pair, the reference's (Σ chosen, Σ rejected) response log-probabilities, summed
    from the same target the DPO loss starts at; one forward over `[c0, r0, c1, r1, …]`."""
    datums = [datum for pair in pairs for datum in pair_datums(pair)]
    with trainer_call(job_id, f"the reference forward of {label}"):
        output = reference.forward(datums, "cross_entropy").result(timeout=waits.step_timeout_s)
    starts = [pair.response_start for pair in pairs]
    return response_logprob_sums(logprobs_of(output.loss_fn_outputs), starts)
