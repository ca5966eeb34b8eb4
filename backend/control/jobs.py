"""Trainer jobs (create, get, delete, resume): wire models, the state machine, the service.

State advances lazily: each read moves a job along `PENDING → CREATING → RUNNING` by the
configured timers, computed from when it entered its state, so behaviour is deterministic for a
given clock and survives restarts. An idle RUNNING job is CANCELLED after its inactivity timeout.
Jobs leaving RUNNING (preempted, cancelled, deleted) are reported to `on_job_lost` hooks, which
the trainer uses to drop its in-memory state, as a lost pod would.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from backend.control import (
    AccountCheck,
    Clock,
    RequestModel,
    ResponseModel,
    check_resource_id,
    registered_base_model,
    rfc3339,
)
from backend.control.shapes import TrainingShapeCatalog
from backend.errors import ApiError
from backend.models.registry import resolve_model
from backend.store import Store

logger = logging.getLogger(__name__)

# The states the local machine reaches (the real platform's enum has more).
JobState = Literal[
    "JOB_STATE_PENDING",
    "JOB_STATE_CREATING",
    "JOB_STATE_RUNNING",
    "JOB_STATE_COMPLETED",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_PAUSED",
    "JOB_STATE_DELETED",
]
RUNNING: JobState = "JOB_STATE_RUNNING"
DELETED: JobState = "JOB_STATE_DELETED"
RESUMABLE: frozenset[JobState] = frozenset(
    {"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED"}
)
TERMINAL: frozenset[JobState] = RESUMABLE | {DELETED}

DEFAULT_INACTIVITY_S = 3600.0
# Every trainer request is activity; writing each one would cost a store transaction per
# request. Activity is kept in memory and written at most this often per job. The state machine
# reads the memory too, so the timeout is exact; a restart loses the unwritten seconds, but it
# fails every RUNNING job anyway.
ACTIVITY_WRITE_S = 5.0
RESTART_MESSAGE = "trainer lost: the local platform restarted"
_DURATION = re.compile(r"^-?\d+(\.\d{1,9})?s$")

JobLostHook = Callable[[str], None]


class TrainingConfig(RequestModel):
    base_model: str
    lora_rank: StrictInt = Field(default=0, ge=0)
    learning_rate: float = Field(default=1e-5, ge=0)
    max_context_length: StrictInt | None = Field(default=None, gt=0)
    custom_image_tag: str | None = None
    region: str | None = None
    accelerator_type: str | None = None
    accelerator_count: StrictInt | None = Field(default=None, ge=0)
    extra_args: list[str] | None = None
    # Sent by the published SDK when set: the size of a trainable projection head, which the
    # local trainer does not build; accepted and echoed so such a create does not fail.
    projection_head_dim: StrictInt | None = Field(default=None, ge=0)

    @field_validator("base_model")
    @classmethod
    def _registered(cls, value: str) -> str:
        return registered_base_model(value)

    @field_validator("lora_rank")
    @classmethod
    def _rank_fits_model(cls, value: int, info: ValidationInfo) -> int:
        # Checked here, before any trainer exists: a rank beyond the narrowest adapted layer
        # adds no capacity, and a huge one would exhaust the shared backend's memory.
        base_model = info.data.get("base_model")
        if base_model is None:  # no base model: its own error is reported
            return value
        limit = resolve_model(base_model).max_lora_rank
        if value > limit:
            raise ValueError(
                f"lora_rank {value} is larger than {base_model} allows: at most {limit}"
            )
        return value

    @field_validator("max_context_length")
    @classmethod
    def _fits_model(cls, value: int | None, info: ValidationInfo) -> int | None:
        # The SDK sends its default (4096) unless told otherwise, and the local models are
        # smaller (tiny: 256). As a training shape would, cap the request at the model's context
        # and echo the effective value on the job; the trainer then rejects longer sequences.
        base_model = info.data.get("base_model")
        if value is None or base_model is None:  # no base model: its own error is reported
            return value
        context = resolve_model(base_model).context_length
        if value > context:
            logger.info(
                "maxContextLength %d capped at the %d tokens of %s", value, context, base_model
            )
        return min(value, context)


class TrainerJobCreate(RequestModel):
    """The job create body; every field is echoed back on the job."""

    service_mode: bool = True
    keep_alive: bool = False
    dataset: str = ""
    training_config: TrainingConfig
    node_count: StrictInt | None = Field(default=None, ge=1)
    trainer_replica_count: StrictInt | None = Field(default=None, ge=1)
    display_name: str | None = Field(default=None, max_length=63)
    hot_load_deployment_id: str | None = None
    purpose: str | None = None
    managed_by: str | None = None
    forward_only: bool = False
    preemptible: bool = False
    disable_inactivity_cleanup: bool = False
    inactivity_timeout: str | None = None
    # Capacity placement on the real platform. Published SDK releases since 1.2.9 send
    # `useReservation` on every create; one machine has no reservations, so these are echoed only.
    use_reservation: bool | None = None
    reservation_target: str | None = None
    extra_values: dict[str, str] | None = None

    @field_validator("inactivity_timeout")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _DURATION.match(value):
            raise ValueError("must be a duration in seconds such as '3600s' or '1.5s'")
        if float(value[:-1]) < 0:
            raise ValueError("must not be negative")
        return value

    def inactivity_limit_s(self) -> float | None:
        """Seconds of inactivity before cleanup; None when cleanup is disabled."""
        if self.disable_inactivity_cleanup:
            return None
        seconds = float(self.inactivity_timeout[:-1]) if self.inactivity_timeout else 0.0
        return seconds or DEFAULT_INACTIVITY_S  # unset or 0 → the server default


class JobStatus(ResponseModel):
    code: str
    message: str


class TrainerJob(TrainerJobCreate):
    """The job object: the create fields echoed, plus name, state and times."""

    model_config = ConfigDict(extra="ignore")

    name: str
    state: JobState
    create_time: str
    update_time: str
    completed_time: str | None = None
    status_message: str
    status: JobStatus


class JobRecord(BaseModel):
    """A trainer job as stored; `state_since` anchors the timers of the current state."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    spec: TrainerJobCreate
    state: JobState
    status_code: str
    status_message: str
    create_time: float
    update_time: float
    state_since: float
    last_activity: float
    completed_time: float | None = None
    training_shape: str | None = None
    linked_deployment_id: str | None = None

    def moved_to(self, state: JobState, at: float, message: str, code: str = "OK") -> JobRecord:
        return self.model_copy(
            update={
                "state": state,
                "state_since": at,
                "update_time": at,
                "status_message": message,
                "status_code": code,
                "completed_time": at if state in TERMINAL else None,
                "last_activity": at,
            }
        )


class CreateOptions(BaseModel):
    """The query parameters of job create (`rlorTrainerJobId`, `trainingShape`, ...)."""

    model_config = ConfigDict(frozen=True)

    job_id: str | None = None
    training_shape: str | None = None
    deployment_id: str | None = None


class TrainerJobService:
    """Create, read, delete and resume trainer jobs; advance their states; report lost jobs."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        shapes: TrainingShapeCatalog,
        *,
        pending_s: float,
        creating_s: float,
        activity_write_s: float = ACTIVITY_WRITE_S,
    ) -> None:
        self._store = store
        self._jobs = store.documents("trainer_jobs", JobRecord)
        self._clock = clock
        self._shapes = shapes
        self._pending_s = pending_s
        self._creating_s = creating_s
        self._lost_hooks: list[JobLostHook] = []
        self.account_id = shapes.account_id
        self._activity_write_s = activity_write_s
        self._activity_lock = threading.Lock()
        self._unwritten_activity: dict[str, float] = {}  # job id -> latest activity not stored
        self._activity_written: dict[str, float] = {}  # job id -> when activity was last stored

    def job_name(self, job_id: str) -> str:
        return f"accounts/{self.account_id}/rlorTrainerJobs/{job_id}"

    def on_job_lost(self, callback: JobLostHook) -> None:
        """Call `callback(job_id)` whenever a job leaves RUNNING or is deleted."""
        self._lost_hooks.append(callback)

    def create(self, spec: TrainerJobCreate, options: CreateOptions) -> TrainerJob:
        job_id = options.job_id or f"training-api-service-{secrets.token_hex(4)}"
        check_resource_id(job_id, "rlorTrainerJobId")
        config = spec.training_config
        if options.training_shape:
            self._shapes.check_ref(options.training_shape, config.base_model)
        if config.max_context_length is None:
            context = resolve_model(config.base_model).context_length
            config = config.model_copy(update={"max_context_length": context})
        now = self._clock()
        record = JobRecord(
            job_id=job_id,
            spec=spec.model_copy(update={"training_config": config}),
            state="JOB_STATE_PENDING",
            status_code="OK",
            status_message="waiting for capacity",
            create_time=now,
            update_time=now,
            state_since=now,
            last_activity=now,
            training_shape=options.training_shape,
            linked_deployment_id=options.deployment_id,
        )
        if not self._jobs.insert(job_id, record):
            raise ApiError.already_exists(
                f"trainer job {self.job_name(job_id)!r} already exists "
                "(ids of deleted jobs are not reused)",
                reason="TRAINER_JOB_ALREADY_EXISTS",
            )
        logger.info("created trainer job %s (%s)", job_id, config.base_model)
        return self.to_wire(record)

    def find(self, job_id: str) -> JobRecord | None:
        """The job's current record (states advanced to now), or None when it never existed."""
        with self._session() as lost:
            return self._current(job_id, lost)

    def get(self, job_id: str) -> TrainerJob:
        return self.to_wire(self.require(job_id))

    def require(self, job_id: str) -> JobRecord:
        """Like `find`, but a missing job is a 404."""
        with self._session() as lost:
            return self._current_or_404(job_id, lost)

    def delete(self, job_id: str) -> TrainerJob:
        """Tombstone the job (GET still returns it); deleting a tombstone changes nothing."""
        with self._session() as lost:
            record = self._current_or_404(job_id, lost)
            if record.state != DELETED:
                deleted = record.moved_to(DELETED, self._clock(), "deleted")
                record = self._save(record, deleted, lost)
                if job_id not in lost:
                    lost.append(job_id)
        return self.to_wire(record)

    def resume(self, job_id: str) -> TrainerJob:
        """Resumable → PENDING before answering (a client polling next must not see FAILED)."""
        with self._session() as lost:
            record = self._current_or_404(job_id, lost)
            if record.state == DELETED:
                raise ApiError.failed_precondition(
                    f"trainer job {self.job_name(job_id)!r} is deleted and cannot be resumed; "
                    "create a new job with a new id",
                    reason="TRAINER_JOB_DELETED",
                )
            if record.state in RESUMABLE:
                pending = record.moved_to("JOB_STATE_PENDING", self._clock(), "resumed: waiting")
                record = self._save(record, pending, lost)
        return self.to_wire(record)

    def touch(self, job_id: str) -> None:
        """Record trainer activity now (resets the inactivity timer of a RUNNING job).

        Stored at most every `activity_write_s` per job; in between it is remembered in memory,
        where the inactivity check reads it, so a busy trainer costs no store transaction.
        """
        now = self._clock()
        with self._activity_lock:
            written = self._activity_written.get(job_id)
            if written is not None and now - written < self._activity_write_s:
                self._unwritten_activity[job_id] = now
                return
            self._activity_written[job_id] = now
            self._unwritten_activity.pop(job_id, None)
        with self._session() as lost:
            record = self._current(job_id, lost)
            if record is not None and record.state == RUNNING:
                latest = max(now, record.last_activity)
                self._save(record, record.model_copy(update={"last_activity": latest}), lost)

    def fail_running(self, job_id: str, message: str) -> None:
        """RUNNING → FAILED (a lost trainer); ValueError for any other state."""
        with self._session() as lost:
            record = self._current(job_id, lost)
            if record is None:
                raise ValueError(f"no trainer job {job_id!r}")
            if record.state != RUNNING:
                raise ValueError(
                    f"trainer job {job_id!r} is {record.state}, not {RUNNING}: "
                    "only a running trainer can be preempted"
                )
            failed = record.moved_to("JOB_STATE_FAILED", self._clock(), message, "UNAVAILABLE")
            self._save(record, failed, lost)

    def fail_after_restart(self) -> list[str]:
        """At startup: RUNNING jobs lost their trainer with the previous process → FAILED."""
        failed: list[str] = []
        now = self._clock()
        with self._store.transaction():
            for record in self._jobs.all():
                if record.state == RUNNING:
                    lost = record.moved_to("JOB_STATE_FAILED", now, RESTART_MESSAGE, "UNAVAILABLE")
                    self._jobs.replace(record.job_id, lost)
                    failed.append(record.job_id)
        if failed:
            logger.info("restart: %d running trainer job(s) marked FAILED", len(failed))
        return failed

    def to_wire(self, record: JobRecord) -> TrainerJob:
        completed = record.completed_time
        return TrainerJob.model_validate(
            {
                **record.spec.model_dump(),
                "training_config": record.spec.training_config,
                "name": self.job_name(record.job_id),
                "state": record.state,
                "create_time": rfc3339(record.create_time),
                "update_time": rfc3339(record.update_time),
                "completed_time": None if completed is None else rfc3339(completed),
                "status_message": record.status_message,
                "status": JobStatus(code=record.status_code, message=record.status_message),
            }
        )

    @contextmanager
    def _session(self) -> Iterator[list[str]]:
        # One transaction per operation. Jobs appended to the list are reported to the hooks
        # after the outermost transaction commits, outside the store's lock.
        lost: list[str] = []
        with self._store.transaction():
            yield lost
            for job_id in lost:
                self._store.after_commit(partial(self._fire_lost, job_id))

    def _current(self, job_id: str, lost: list[str]) -> JobRecord | None:
        record = self._jobs.get(job_id)
        if record is None:
            return None
        current = self._with_unwritten_activity(record)
        advanced = self._advance(current, self._clock())
        if advanced.state == record.state:  # no timer expired: unwritten activity stays so
            return current
        return self._save(record, advanced, lost)

    def _with_unwritten_activity(self, record: JobRecord) -> JobRecord:
        """The record as the inactivity timer must see it: with activity not yet stored."""
        with self._activity_lock:
            seen = self._unwritten_activity.get(record.job_id)
        if seen is None or record.state != RUNNING or seen <= record.last_activity:
            return record
        return record.model_copy(update={"last_activity": seen})

    def _current_or_404(self, job_id: str, lost: list[str]) -> JobRecord:
        record = self._current(job_id, lost)
        if record is None:
            raise ApiError.not_found(
                f"trainer job {self.job_name(job_id)!r} not found", reason="TRAINER_JOB_NOT_FOUND"
            )
        return record

    def _save(self, before: JobRecord, after: JobRecord, lost: list[str]) -> JobRecord:
        if after != before:
            self._jobs.replace(after.job_id, after)
            if after.state != before.state:
                # A new state starts its own activity (moved_to stamps it): forget the old.
                with self._activity_lock:
                    self._unwritten_activity.pop(after.job_id, None)
                    self._activity_written.pop(after.job_id, None)
            if before.state == RUNNING and after.state != RUNNING:
                lost.append(after.job_id)
        return after

    def _advance(self, record: JobRecord, now: float) -> JobRecord:
        """Apply every timer that has expired by `now`, each at the time it expired."""
        while (following := self._next(record, now)) is not None:
            record = following
        return record

    def _next(self, record: JobRecord, now: float) -> JobRecord | None:
        if record.state == "JOB_STATE_PENDING":
            at = record.state_since + self._pending_s
            return record.moved_to("JOB_STATE_CREATING", at, "starting") if now >= at else None
        if record.state == "JOB_STATE_CREATING":
            at = record.state_since + self._creating_s
            return record.moved_to(RUNNING, at, "trainer is running") if now >= at else None
        limit = record.spec.inactivity_limit_s()
        if record.state == RUNNING and limit is not None and now >= record.last_activity + limit:
            at = record.last_activity + limit
            message = f"cancelled after {limit:g} s without trainer activity (resumable)"
            return record.moved_to("JOB_STATE_CANCELLED", at, message, "CANCELLED")
        return None

    def _fire_lost(self, job_id: str) -> None:
        for hook in self._lost_hooks:
            try:
                hook(job_id)
            except Exception:
                # A broken hook must not fail the control-plane request that triggered it.
                logger.exception("on_job_lost hook failed for job %s", job_id)


def jobs_router(service: TrainerJobService, check_account: AccountCheck) -> APIRouter:
    """Create, get, delete and resume under `/v1/accounts/{account}/rlorTrainerJobs`."""
    router = APIRouter(
        prefix="/v1/accounts/{account}/rlorTrainerJobs", dependencies=[Depends(check_account)]
    )

    @router.post("", response_model_exclude_none=True)
    def create_trainer_job(
        body: TrainerJobCreate,
        job_id: Annotated[str | None, Query(alias="rlorTrainerJobId")] = None,
        training_shape: Annotated[str | None, Query(alias="trainingShape")] = None,
        skip_validations: Annotated[bool, Query(alias="skipValidations")] = False,
        deployment_id: Annotated[str | None, Query(alias="deploymentId")] = None,
    ) -> TrainerJob:
        # skipValidations is accepted (the SDK's manual path always sends it) but the local
        # platform validates anyway: its checks are cheap and catch mistakes before training.
        options = CreateOptions(
            job_id=job_id, training_shape=training_shape, deployment_id=deployment_id
        )
        return service.create(body, options)

    @router.get("/{job_id}", response_model_exclude_none=True)
    def get_trainer_job(job_id: str) -> TrainerJob:
        return service.get(job_id)

    @router.delete("/{job_id}", response_model_exclude_none=True)
    def delete_trainer_job(job_id: str) -> TrainerJob:
        return service.delete(job_id)

    # A custom verb (`…/{id}:resume`, AIP-136): the literal suffix follows the path parameter.
    @router.post("/{job_id}:resume", response_model_exclude_none=True)
    def resume_trainer_job(job_id: str) -> TrainerJob:
        return service.resume(job_id)

    return router
