"""Checkpoint bookkeeping against the control plane: what a job holds, and what a save became.

Both are read-only (checkpoint listings). `list_resumable_checkpoints` is a task that retries.
`confirmed_checkpoint_name` is the read-back a save needs: a trainer may store a save under
another name than requested, and the ledger must record the name that really exists before
anyone resumes from it. It is a plain function, called by the segment task right after its save
(one task run per cadence point fewer; the SDK still retries its transient HTTP failures).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sdk import CheckpointInfo, WaitTimeoutError
from tasks.platform import PlatformEndpoint
from tasks.policy import SHORT_TIMEOUT_S, TASK_RETRIES, TASK_RETRY_DELAYS, retry_transient

__all__ = ["confirmed_checkpoint_name", "list_resumable_checkpoints"]


def _resumable(rows: list[CheckpointInfo]) -> list[CheckpointInfo]:
    return [row for row in rows if row.resumable]


@task(
    name="list-checkpoints",
    task_run_name="checkpoints of {job_id}",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=SHORT_TIMEOUT_S,
)
def list_resumable_checkpoints(endpoint: PlatformEndpoint, job_id: str) -> list[str]:
    """Names of the job's resumable (`save_state`) checkpoints, oldest first."""
    with endpoint.trainer_manager() as manager:
        return [row.checkpoint_id for row in _resumable(manager.list_checkpoints(job_id))]


def confirmed_checkpoint_name(
    endpoint: PlatformEndpoint, job_id: str, requested_name: str, known_names: Sequence[str]
) -> str:
    """The server's name of the save requested as `requested_name`, once listed: that name,
    else the newest resumable checkpoint not in `known_names` (a renamed save)."""
    waits = endpoint.waits
    known = set(known_names)
    started = time.monotonic()
    with endpoint.trainer_manager() as manager:
        while True:
            names = [row.checkpoint_id for row in _resumable(manager.list_checkpoints(job_id))]
            fresh = [name for name in names if name not in known]
            if requested_name in names or fresh:
                name = requested_name if requested_name in names else fresh[-1]
                break
            waited = time.monotonic() - started
            if waited >= waits.checkpoint_appear_timeout_s:
                raise WaitTimeoutError(
                    waited_for=f"checkpoint {requested_name} of {job_id} to be listed",
                    last_state=f"{len(names)} resumable checkpoints listed",
                    waited_s=waited,
                )
            time.sleep(min(waits.poll_interval_s, 3.0))
    if name != requested_name:
        get_run_logger().warning("the trainer stored %s as %s", requested_name, name)
    return name
