"""Weight sync: export the policy for serving, hotload it, verify the deployment serves it.

`WeightSyncer.save_and_hotload` already waits for every replica to report the new identity
(failure-modes W7); this task reads the served identity back once more and returns it, so the
ledger's hotload row records what the deployment was *seen* serving. The snapshot export is an
ordered trainer operation, hence `retries=0`: a failure fails the flow, whose retry resumes and
starts a fresh delta chain with a `base` load (W4).
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from sdk import StaleDeploymentError, WeightSyncer
from tasks.errors import trainer_call
from tasks.policy import SHORT_TIMEOUT_S

__all__ = ["HotloadResult", "SnapshotKind", "save_and_hotload"]

SnapshotKind = Literal["base", "delta"]


class HotloadResult(BaseModel):
    """A hotload the deployment was seen serving."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity: str
    deployment_id: str
    checkpoint_type: SnapshotKind
    step: int
    timing: dict[str, float]


@task(
    name="save-and-hotload",
    task_run_name="hotload {name} ({checkpoint_type})",
    retries=0,  # exports through the training client's ordered session
    cache_policy=NO_CACHE,  # holds the live syncer
    timeout_seconds=SHORT_TIMEOUT_S * 2,
)
def save_and_hotload(
    syncer: WeightSyncer, name: str, checkpoint_type: SnapshotKind, step: int, job_id: str
) -> HotloadResult:
    """Save snapshot `name` (`base` or `delta`), hotload it and verify what is served."""
    deployment_id = syncer.deployment_id or ""
    with trainer_call(job_id, f"the sampler export {name}", step):
        identity = syncer.save_and_hotload(name, checkpoint_type=checkpoint_type)
    served = syncer.check_deployment_state()
    if served != identity:
        raise StaleDeploymentError(identity, served, deployment_id=deployment_id)
    get_run_logger().info("deployment %s serves %s (%s)", deployment_id, identity, checkpoint_type)
    return HotloadResult(
        identity=identity,
        deployment_id=deployment_id,
        checkpoint_type=checkpoint_type,
        step=step,
        timing=dict(syncer.last_timing),
    )
