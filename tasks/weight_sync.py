"""Weight sync: export the policy for serving, hotload it, verify the deployment serves it.

`WeightSyncer.sync` decides the snapshot kind (a full `base` first, deltas after), waits until
every replica reports the new identity and returns what it did; this task only names the
trainer call for error mapping and keeps a serialisable copy with the step for the ledger. The
snapshot export is an ordered trainer operation, hence `retries=0`: a failure fails the flow,
whose retry resumes with a fresh syncer, so its first load is a full `base` again.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from sdk import ConfigError, WeightSyncer
from sdk.firetitan_types import CheckpointType
from sdk.weight_syncer import SyncTiming
from tasks.errors import trainer_call
from tasks.policy import SHORT_TIMEOUT_S

__all__ = ["HotloadResult", "save_and_hotload"]


class HotloadResult(BaseModel):
    """A hotload every replica of the deployment was verified serving, at a training step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity: str
    deployment_id: str
    checkpoint_type: CheckpointType
    step: int
    timing: SyncTiming


@task(
    name="save-and-hotload",
    task_run_name="hotload {name}",
    retries=0,  # exports through the training client's ordered session
    cache_policy=NO_CACHE,  # holds the live syncer
    timeout_seconds=SHORT_TIMEOUT_S * 2,
)
def save_and_hotload(syncer: WeightSyncer, name: str, step: int, job_id: str) -> HotloadResult:
    """Save snapshot `name` (the syncer picks `base` or `delta`), hotload and verify it."""
    if syncer.deployment_id is None or not syncer.hotload_enabled:
        raise ConfigError(f"save_and_hotload {name}: the syncer has no deployment to load onto")
    with trainer_call(job_id, f"the sampler export {name}", step):
        synced = syncer.sync(name)
    get_run_logger().info(
        "deployment %s serves %s (%s)", syncer.deployment_id, synced.identity, synced.kind
    )
    return HotloadResult(
        identity=synced.identity,
        deployment_id=syncer.deployment_id,
        checkpoint_type=synced.kind,
        step=step,
        timing=synced.timing,
    )
