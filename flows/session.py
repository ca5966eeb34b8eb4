"""Provisioning and the live clients of one attempt: trainer, deployment, syncer, sampler.

`provision` runs the provisioning tasks (trainer and deployment concurrently, both reused by
id). `TrainerSession` then holds the live clients, built new on every attempt (module globals
survive flow retries, stale sessions must not): one service client per trainer (a second one
would unload the first one's models), a training client, and a fresh
`WeightSyncer`, whose first sync is therefore a `base` load (a delta needs the chain a lost session
held). `resume` loads the ledger's
newest checkpoint that the trainer job still lists, with its optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefect.futures import PrefectFuture, wait

from algorithms.chat import ChatRenderer
from flows.ledger import CheckpointRow, Ledger
from flows.notices import notice
from sdk import (
    BadRequestError,
    ClosesOnExit,
    ConfigError,
    DeploymentManager,
    DeploymentSampler,
    WeightSyncer,
    resolve_checkpoint_path,
)
from tasks.checkpoints import list_resumable_checkpoints
from tasks.errors import TrainerMismatchError, trainer_call
from tasks.platform import PlatformEndpoint
from tasks.provision import (
    DeploymentHandle,
    DeploymentSpec,
    TrainerHandle,
    TrainerSpec,
    ensure_trainer_job,
    provision_deployment,
    wait_for_trainer,
)

if TYPE_CHECKING:
    from sdk.firetitan import FiretitanServiceClient
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = ["Resources", "ResumePoint", "TrainerSession", "provision", "resume"]


@dataclass(frozen=True)
class Resources:
    """What provisioning produced: a ready trainer and, if the run samples, a deployment."""

    trainer: TrainerHandle
    deployment: DeploymentHandle | None


def provision(
    endpoint: PlatformEndpoint, trainer: TrainerSpec, deployment_id: str | None
) -> Resources:
    """The trainer job (created or found), then its readiness and the deployment at once."""
    job = ensure_trainer_job(endpoint, trainer)
    trainer_future = wait_for_trainer.submit(endpoint, job)
    deployment_future = None
    if deployment_id is not None:
        spec = DeploymentSpec(
            deployment_id=deployment_id,
            base_model=trainer.base_model,
            trainer_job_name=job.job_name,
        )
        deployment_future = provision_deployment.submit(endpoint, spec)
    # Both finish (or fail) before either failure propagates: no wait is left running.
    pending: list[PrefectFuture[Any]] = [trainer_future]
    if deployment_future is not None:
        pending.append(deployment_future)
    wait(pending)
    deployment = deployment_future.result() if deployment_future is not None else None
    return Resources(trainer=trainer_future.result(), deployment=deployment)


class TrainerSession(ClosesOnExit):
    """The live clients of one attempt; a context manager that closes them all."""

    def __init__(
        self,
        service: FiretitanServiceClient,
        client: FiretitanTrainingClient,
        job: TrainerHandle,
        renderer: ChatRenderer,
        deployments: DeploymentManager | None = None,
        syncer: WeightSyncer | None = None,
        sampler: DeploymentSampler | None = None,
    ) -> None:
        self.service, self.client, self.job, self.renderer = service, client, job, renderer
        self.deployments, self.syncer, self.sampler = deployments, syncer, sampler
        self._on_close: list[Callable[[], None]] = []

    @classmethod
    def open(
        cls,
        endpoint: PlatformEndpoint,
        resources: Resources,
        *,
        base_model: str,
        lora_rank: int,
        lora_alpha: int,
        seed: int,
        tokenizer_model: str | None,
    ) -> TrainerSession:
        """Connect to the trainer, create the training client, load the tokenizer."""
        from transformers import AutoTokenizer

        from sdk.firetitan import FiretitanServiceClient  # imports tinker's torch stack

        job = resources.trainer
        key = endpoint.api_key.get_secret_value()
        service = FiretitanServiceClient(
            job.base_url, key, model_timeout_s=endpoint.waits.trainer_ready_timeout_s
        )
        try:
            client = _training_client(service, job, base_model, lora_rank, lora_alpha, seed)
            if tokenizer_model is None:
                with trainer_call(job.job_id, "get_info"):
                    # The trainer's own tokenizer (locally: the model directory), so that
                    # rendering matches it.
                    tokenizer_model = client.get_info().model_data.tokenizer_id or base_model
            renderer = ChatRenderer(AutoTokenizer.from_pretrained(tokenizer_model))
        except BaseException:
            service.close()
            raise
        session = cls(service, client, job, renderer)
        if resources.deployment is not None:
            session._attach(endpoint, resources.deployment, base_model)
        return session

    def _attach(self, endpoint: PlatformEndpoint, deployment: DeploymentHandle, base: str) -> None:
        waits = endpoint.waits
        self.deployments = endpoint.deployment_manager()
        self.syncer = WeightSyncer(
            policy_client=self.client,
            deploy_mgr=self.deployments,
            deployment_id=deployment.deployment_id,
            base_model=base,
            hotload_timeout=waits.hotload_timeout_s,
            trainer_job_name=self.job.job_name,
            hotload_poll_interval_s=waits.poll_interval_s,
            hotload_ready_timeout_s=waits.deployment_ready_timeout_s,
            verify_timeout_s=waits.verify_timeout_s,
            verify_poll_interval_s=waits.poll_interval_s,
            warmup_retry_interval_s=waits.poll_interval_s,
        )
        self.sampler = self.deployments.create_sampler(deployment.deployment_id)

    def on_close(self, stop: Callable[[], None]) -> None:
        """Call `stop` first when the session closes (what a recipe runs beside the session,
        such as a rollout producer, ends with it)."""
        self._on_close.append(stop)

    def close(self) -> None:
        try:
            for stop in reversed(self._on_close):
                stop()
        finally:
            if self.deployments is not None:
                self.deployments.close()
            self.service.close()


def _training_client(
    service: FiretitanServiceClient,
    job: TrainerHandle,
    base_model: str,
    lora_rank: int,
    lora_alpha: int,
    seed: int,
) -> FiretitanTrainingClient:
    """The training client; a trainer that refuses the model settings is a config error."""
    try:
        with trainer_call(job.job_id, "create_training_client"):
            return service.create_training_client(
                base_model, lora_rank=lora_rank, seed=seed, lora_alpha=lora_alpha
            )
    except BadRequestError as exc:  # the SDK's error for a refused (user-category) request
        raise TrainerMismatchError(
            f"trainer job {job.job_id} refused base_model={base_model!r}, lora_rank={lora_rank}: "
            f"{exc.server_message}; the job was created with other settings: use another "
            "run_name or platform.trainer_job_id, or the job's settings"
        ) from None


@dataclass(frozen=True)
class ResumePoint:
    """Where an attempt starts: the next step, the raw-row cursor, the row loaded (if any)."""

    next_step: int
    data_cursor: int
    checkpoint: CheckpointRow | None
    job_checkpoints: frozenset[str]  # resumable names the job lists (taken names)


def resume(
    endpoint: PlatformEndpoint,
    ledger: Ledger,
    session: TrainerSession,
    init_from_checkpoint: str | None = None,
) -> ResumePoint:
    """Load the newest ledger checkpoint the job still lists, weights and optimizer state.

    Without one (a fresh start), `init_from_checkpoint` names another checkpoint to start from:
    its weights and optimizer state, with step and cursor at 0 (a phase hand-off, such as RL
    after SFT). The run's own checkpoints win once it has any, so a preempted phase resumes
    where it was instead of starting over from the hand-off.
    """
    job_id = session.job.job_id
    listed = frozenset(list_resumable_checkpoints(endpoint, job_id))
    row = ledger.last_checkpoint(available=listed)
    if row is None:
        if init_from_checkpoint is not None:
            _initialise(endpoint, session, init_from_checkpoint, listed)
        return ResumePoint(0, 0, None, listed)
    with trainer_call(job_id, f"load_state_with_optimizer {row.name}", row.next_step):
        future = session.client.load_state_with_optimizer(row.state_path)
        future.result(timeout=endpoint.waits.save_timeout_s)
    notice(f"resumed from {row.name}: next step {row.next_step}, data cursor {row.data_cursor}")
    return ResumePoint(row.next_step, row.data_cursor, row, listed)


def _initialise(
    endpoint: PlatformEndpoint, session: TrainerSession, ref: str, listed: frozenset[str]
) -> None:
    """Load `<job>:<name>` (or a name of this job) after checking the job lists it."""
    job_id = session.job.job_id
    source_job, _, name = ref.rpartition(":")
    source_job = source_job or job_id
    available = listed if source_job == job_id else list_resumable_checkpoints(endpoint, source_job)
    if name not in available:
        shown = ", ".join(sorted(available)[-10:]) or "none"
        raise ConfigError(
            f"init_from_checkpoint: trainer job {source_job} has no resumable checkpoint "
            f"{name!r} (it has: {shown})"
        )
    path = name if source_job == job_id else resolve_checkpoint_path(name, source_job)
    with trainer_call(job_id, f"load_state_with_optimizer {ref}"):
        future = session.client.load_state_with_optimizer(path)
        future.result(timeout=endpoint.waits.save_timeout_s)
    notice(f"initialised from {ref}: its weights and optimizer state; step and data cursor at 0")
