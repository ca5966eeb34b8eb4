"""Provisioning tasks: the trainer job and the deployment, each reused by its explicit id.

Ids are chosen by the run (or given by the user), so every task here is get-or-create and safe
to retry, and a flow retry after a preemption finds the same job and reconnects to it
(`reconnect_and_wait`: RUNNING → health check, FAILED/CANCELLED → resume). None is cached: a
cached "ready" would be stale after a preemption.
"""

from __future__ import annotations

from typing import Final

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from sdk import DeploymentConfig, TrainerJobConfig
from sdk.resources import last_segment
from tasks.errors import DeploymentMismatchError
from tasks.platform import PlatformEndpoint
from tasks.policy import SHORT_TIMEOUT_S, TASK_RETRIES, TASK_RETRY_DELAYS, retry_transient

__all__ = [
    "SUBMITTED_WAITS",
    "DeploymentHandle",
    "DeploymentSpec",
    "TrainerHandle",
    "TrainerJobRef",
    "TrainerSpec",
    "ensure_trainer_job",
    "provision_deployment",
    "wait_for_trainer",
]


# The two readiness waits run concurrently, submitted to Prefect's thread pool, where a Prefect
# timeout cannot interrupt a blocking call (Prefect warns so on every run) and would only
# contradict the real deadlines: the SDK's waits (`Waits.trainer_ready_timeout_s`,
# `trainer_pending_timeout_s`, `deployment_ready_timeout_s`) end them with `WaitTimeoutError`.
SUBMITTED_WAITS: Final = frozenset({"wait-for-trainer", "provision-deployment"})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainerSpec(_Model):
    """The trainer job a run needs."""

    job_id: str
    base_model: str
    lora_rank: int
    display_name: str | None = None
    max_context_length: int | None = None


class TrainerJobRef(_Model):
    """A trainer job that exists; `existed`: it did before this call (so: reconnect to it)."""

    job_id: str
    job_name: str
    existed: bool


class TrainerHandle(_Model):
    """A ready trainer: its id, resource name and gateway URL."""

    job_id: str
    job_name: str
    base_url: str
    max_context_length: int | None = None


class DeploymentSpec(_Model):
    """The hotload-enabled deployment a run samples from, attached to its trainer."""

    deployment_id: str
    base_model: str
    trainer_job_name: str


class DeploymentHandle(_Model):
    """A READY deployment serving the run's base model for the run's trainer."""

    deployment_id: str
    base_model: str


@task(
    name="ensure-trainer-job",
    task_run_name="trainer job {spec.job_id}",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=SHORT_TIMEOUT_S,
)
def ensure_trainer_job(endpoint: PlatformEndpoint, spec: TrainerSpec) -> TrainerJobRef:
    """The job `spec.job_id`: found, or created (idempotent: create answers 409 → GET)."""
    with endpoint.trainer_manager() as manager:
        existing = manager.try_get(spec.job_id)
        if existing is not None:
            get_run_logger().info("trainer job %s exists (%s)", spec.job_id, existing.state)
            return TrainerJobRef(job_id=spec.job_id, job_name=existing.name, existed=True)
        config = TrainerJobConfig(
            base_model=spec.base_model,
            lora_rank=spec.lora_rank,
            max_context_length=spec.max_context_length,
            display_name=spec.display_name,
            requested_job_id=spec.job_id,
        )
        created = manager.create(config)
    return TrainerJobRef(job_id=created.job_id, job_name=created.job_name, existed=False)


@task(
    name="wait-for-trainer",
    task_run_name="trainer {job.job_id} ready",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=None,  # runs submitted, in a worker thread: see `SUBMITTED_WAITS`
)
def wait_for_trainer(endpoint: PlatformEndpoint, job: TrainerJobRef) -> TrainerHandle:
    """Wait until the trainer answers; an existing job is reconnected (resumed if it failed)."""
    waits = endpoint.waits
    with endpoint.trainer_manager() as manager:
        if job.existed:
            ready = manager.reconnect_and_wait(
                job.job_id,
                poll_interval_s=waits.poll_interval_s,
                timeout_s=waits.trainer_ready_timeout_s,
                max_wait_for_resumable_s=waits.reconnect_window_s,
                pending_timeout_s=waits.trainer_pending_timeout_s,
                transitional_poll_s=waits.poll_interval_s,
            )
        else:
            ready = manager.wait_for_ready(
                job.job_id,
                job_name=job.job_name,
                poll_interval_s=waits.poll_interval_s,
                timeout_s=waits.trainer_ready_timeout_s,
                pending_timeout_s=waits.trainer_pending_timeout_s,
            )
    return TrainerHandle(
        job_id=ready.job_id,
        job_name=ready.job_name,
        base_url=ready.base_url,
        max_context_length=ready.max_context_length,
    )


@task(
    name="provision-deployment",
    task_run_name="deployment {spec.deployment_id} ready",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=None,  # runs submitted, in a worker thread: see `SUBMITTED_WAITS`
)
def provision_deployment(endpoint: PlatformEndpoint, spec: DeploymentSpec) -> DeploymentHandle:
    """Create or reuse the deployment, refuse one on another base model, attach it to the
    run's trainer (skipped when already attached: a PATCH without a change never rolls the
    pod) and wait until it is READY."""
    waits = endpoint.waits
    config = DeploymentConfig(
        deployment_id=spec.deployment_id,
        base_model=spec.base_model,
        hot_load_trainer_job=spec.trainer_job_name,
        min_replica_count=1,
        max_replica_count=1,
    )
    with endpoint.deployment_manager() as manager:
        info = manager.create_or_get(config, delete_poll_interval_s=waits.poll_interval_s)
        served = info.base_model
        if served and last_segment(served) != last_segment(spec.base_model):
            raise DeploymentMismatchError(
                f"deployment {spec.deployment_id} serves base model {served!r}, but the run "
                f"trains {spec.base_model!r}; use a deployment of {spec.base_model!r} or none"
            )
        if info.hot_load_trainer_job != spec.trainer_job_name:
            manager.reattach_trainer(
                info,
                base_model=spec.base_model,
                trainer_job_name=spec.trainer_job_name,
                timeout_s=waits.deployment_ready_timeout_s,
                poll_interval_s=waits.poll_interval_s,
            )
        manager.wait_for_ready(
            spec.deployment_id,
            timeout_s=waits.deployment_ready_timeout_s,
            poll_interval_s=waits.poll_interval_s,
        )
    return DeploymentHandle(deployment_id=spec.deployment_id, base_model=spec.base_model)
