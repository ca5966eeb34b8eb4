"""Deployments (create, get, delete, patch): hotload-enabled inference endpoints of base models.

A deployment goes `CREATING → READY` once its timer has run and, when a serving runtime is
attached (`attach_replicas`), its replica has loaded the base weights; creation starts that load
at once. Re-attaching it to another trainer job (PATCH `hot_load_trainer_job`) goes `UPDATING →
READY` the same way and empties the served snapshot, like the pod restart it is on the real
platform. Scaling to zero, re-attaching and deleting notify the `on_deployment_reset` hooks, so
the serving side can unload the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from pydantic import model_validator as model_check
from pydantic.alias_generators import to_snake

from backend.control import (
    AccountCheck,
    Clock,
    RequestModel,
    ResponseModel,
    check_resource_id,
    registered_base_model,
    rfc3339,
)
from backend.control.jobs import DELETED, TrainerJobService
from backend.errors import ApiError, describe_validation_errors
from backend.models.registry import canonical_model_name
from backend.store import Store

logger = logging.getLogger(__name__)

DeploymentState = Literal["CREATING", "READY", "UPDATING", "FAILED", "DELETING", "DELETED"]
BucketType = Literal["BUCKET_TYPE_UNSPECIFIED", "FW_HOSTED", "MINIO", "S3", "NEBIUS"]
DeploymentResetHook = Callable[[str], None]


class ReplicaGate(Protocol):
    """The serving side's answer to "are the base weights loaded?"."""

    def replica_up_since(
        self, deployment_id: str, base_model: str, not_before: float
    ) -> float | None:
        """When a replica started at or after `not_before` finished loading the base weights
        (clock time); None while there is none, which starts one. Must not block or touch
        the store (it is asked inside a store transaction)."""
        ...


class Placement(RequestModel):
    region: str | None = None


class DeploymentCreate(RequestModel):
    """The create (`POST .../deployments`) body; echoed back on the deployment."""

    base_model: str
    display_name: str | None = Field(default=None, max_length=63)
    description: str | None = None
    min_replica_count: StrictInt = Field(default=0, ge=0)
    max_replica_count: StrictInt = Field(default=1, ge=0)
    enable_hot_load: bool = False
    for_training: bool = False
    placement: Placement | None = None
    hot_load_bucket_type: BucketType = "FW_HOSTED"
    hot_load_trainer_job: str | None = None
    hot_load_transition_type: Literal["ASYNC", "SYNC"] | None = None
    deployment_shape: str | None = None
    accelerator_type: str | None = None
    accelerator_count: StrictInt | None = Field(default=None, ge=0)
    extra_args: list[str] | None = None
    extra_values: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    @field_validator("base_model")
    @classmethod
    def _registered(cls, value: str) -> str:
        return registered_base_model(value)

    @model_check(mode="after")
    def _replicas_ordered(self) -> Self:
        if self.min_replica_count > self.max_replica_count:
            raise ValueError(
                f"minReplicaCount {self.min_replica_count} exceeds "
                f"maxReplicaCount {self.max_replica_count}"
            )
        return self


class DeploymentPatch(RequestModel):
    """A PATCH body (masked update or scale to zero): only the mutable fields; which of
    them apply is said by `updateMask`."""

    display_name: str | None = None
    description: str | None = None
    min_replica_count: StrictInt | None = None
    max_replica_count: StrictInt | None = None
    enable_hot_load: bool | None = None
    hot_load_bucket_type: BucketType | None = None
    hot_load_trainer_job: str | None = None
    hot_load_transition_type: Literal["ASYNC", "SYNC"] | None = None
    extra_args: list[str] | None = None
    extra_values: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


MUTABLE_FIELDS = frozenset(DeploymentPatch.model_fields)


class Deployment(DeploymentCreate):
    """The deployment object: the create fields plus name, state, times and replicas."""

    model_config = ConfigDict(extra="ignore")

    name: str
    state: DeploymentState
    create_time: str
    update_time: str
    replica_count: int
    hot_load_bucket_url: str


class Empty(ResponseModel):
    """The body of a successful DELETE."""


class DeploymentRecord(BaseModel):
    """A deployment as stored; `served_snapshot_identity` belongs to the serving side."""

    model_config = ConfigDict(frozen=True)

    deployment_id: str
    spec: DeploymentCreate
    state: DeploymentState
    create_time: float
    update_time: float
    state_since: float
    served_snapshot_identity: str = ""


class DeploymentService:
    """Create, read, update and delete deployments; advance their states by timers."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        jobs: TrainerJobService,
        hotload_root: Path,
        *,
        creating_s: float,
        updating_s: float,
    ) -> None:
        self._store = store
        self._deployments = store.documents("deployments", DeploymentRecord)
        self._clock = clock
        self._jobs = jobs
        self._hotload_root = hotload_root
        self._creating_s = creating_s
        self._updating_s = updating_s
        self._reset_hooks: list[DeploymentResetHook] = []
        self._replicas: ReplicaGate | None = None
        self.account_id = jobs.account_id

    def name(self, deployment_id: str) -> str:
        return f"accounts/{self.account_id}/deployments/{deployment_id}"

    def on_deployment_reset(self, callback: DeploymentResetHook) -> None:
        """Call `callback(deployment_id)` when its weights must be unloaded."""
        self._reset_hooks.append(callback)

    def attach_replicas(self, replicas: ReplicaGate) -> None:
        """READY then also waits for the deployment's replica to have its base weights."""
        self._replicas = replicas

    def create(self, spec: DeploymentCreate, deployment_id: str | None) -> Deployment:
        if not deployment_id:
            raise ApiError.invalid_argument("deploymentId is required (a query parameter)")
        check_resource_id(deployment_id, "deploymentId")
        self._check_trainer_link(spec.hot_load_trainer_job, spec.base_model)
        now = self._clock()
        record = DeploymentRecord(
            deployment_id=deployment_id,
            spec=spec,
            state="CREATING",
            create_time=now,
            update_time=now,
            state_since=now,
        )
        if not self._deployments.insert(deployment_id, record):
            raise ApiError.already_exists(
                f"deployment {self.name(deployment_id)!r} already exists",
                reason="DEPLOYMENT_ALREADY_EXISTS",
            )
        logger.info("created deployment %s (%s)", deployment_id, spec.base_model)
        if self._replicas is not None and spec.max_replica_count > 0:
            # Start loading the base weights now, so READY comes as soon as they are in.
            self._replicas.replica_up_since(deployment_id, spec.base_model, now)
        return self.to_wire(record)

    def find(self, deployment_id: str) -> DeploymentRecord | None:
        """The current record (timers applied), or None when there is no such deployment."""
        with self._store.transaction():
            record = self._deployments.get(deployment_id)
            if record is None:
                return None
            return self._save(record, self._advance(record, self._clock()))

    def get(self, deployment_id: str) -> Deployment:
        return self.to_wire(self._require(deployment_id))

    def update(
        self, deployment_id: str, patch: DeploymentPatch, update_mask: str | None
    ) -> Deployment:
        """PATCH with a mask (exactly the masked fields) or without one (the fields sent)."""
        fields = _mask_fields(update_mask) if update_mask else sorted(patch.model_fields_set)
        with self._resets() as reset:
            record = self._require(deployment_id)
            spec = _merged(record.spec, patch, fields)
            now = self._clock()
            updated = record.model_copy(update={"spec": spec, "update_time": now})
            if spec.hot_load_trainer_job != record.spec.hot_load_trainer_job:
                self._check_trainer_link(spec.hot_load_trainer_job, spec.base_model)
                # A new trainer link restarts the serving pod: nothing is served until the
                # next (base) hotload.
                updated = updated.model_copy(
                    update={"state": "UPDATING", "state_since": now, "served_snapshot_identity": ""}
                )
                reset.append(deployment_id)
            elif spec.max_replica_count == 0 and record.spec.max_replica_count > 0:
                # Scale to zero unloads the weights; the next load starts from the base.
                updated = updated.model_copy(update={"served_snapshot_identity": ""})
                reset.append(deployment_id)
            self._deployments.replace(deployment_id, updated)
        return self.to_wire(updated)

    def delete(self, deployment_id: str) -> None:
        """Remove the deployment (the SDK always deletes with `hard=true`): GET answers 404."""
        with self._resets() as reset:
            if not self._deployments.delete(deployment_id):
                raise self._not_found(deployment_id)
            reset.append(deployment_id)
        logger.info("deleted deployment %s", deployment_id)

    def served_snapshot(self, deployment_id: str) -> str:
        """The snapshot identity the deployment serves ("" for none)."""
        return self._require(deployment_id).served_snapshot_identity

    def set_served_snapshot(self, deployment_id: str, identity: str) -> None:
        with self._store.transaction():
            record = self._require(deployment_id)
            served = record.model_copy(update={"served_snapshot_identity": identity})
            self._deployments.replace(deployment_id, served)

    def to_wire(self, record: DeploymentRecord) -> Deployment:
        spec = record.spec
        serving = record.state == "READY"
        replicas = min(max(spec.min_replica_count, 1), spec.max_replica_count) if serving else 0
        return Deployment.model_validate(
            {
                **spec.model_dump(),
                "placement": spec.placement,
                "name": self.name(record.deployment_id),
                "state": record.state,
                "create_time": rfc3339(record.create_time),
                "update_time": rfc3339(record.update_time),
                "replica_count": replicas,
                "hot_load_bucket_url": (self._hotload_root / record.deployment_id).as_uri(),
            }
        )

    def _require(self, deployment_id: str) -> DeploymentRecord:
        record = self.find(deployment_id)
        if record is None:
            raise self._not_found(deployment_id)
        return record

    def _not_found(self, deployment_id: str) -> ApiError:
        return ApiError.not_found(
            f"deployment {self.name(deployment_id)!r} not found", reason="DEPLOYMENT_NOT_FOUND"
        )

    def _check_trainer_link(self, job_name: str | None, base_model: str) -> None:
        """`hotLoadTrainerJob` must name a live job of this account training the same model."""
        if not job_name:
            return
        prefix = f"accounts/{self.account_id}/rlorTrainerJobs/"
        job_id = job_name.removeprefix(prefix)
        if not job_name.startswith(prefix) or not job_id or "/" in job_id:
            raise ApiError.invalid_argument(
                f"hotLoadTrainerJob {job_name!r} is invalid: expected {prefix}<job id>"
            )
        job = self._jobs.find(job_id)
        if job is None or job.state == DELETED:
            raise ApiError.invalid_argument(
                f"hotLoadTrainerJob {job_name!r} does not name a live trainer job"
            )
        job_model = job.spec.training_config.base_model
        if canonical_model_name(job_model) != canonical_model_name(base_model):
            raise ApiError.invalid_argument(
                f"hotLoadTrainerJob {job_name!r} trains base model {job_model!r}, "
                f"but the deployment's baseModel is {base_model!r}"
            )

    def _advance(self, record: DeploymentRecord, now: float) -> DeploymentRecord:
        delay = {"CREATING": self._creating_s, "UPDATING": self._updating_s}.get(record.state)
        if delay is None or now < record.state_since + delay:
            return record
        at = record.state_since + delay
        if self._replicas is not None and record.spec.max_replica_count > 0:
            up = self._replicas.replica_up_since(
                record.deployment_id, record.spec.base_model, record.state_since
            )
            if up is None:
                return record
            at = max(at, up)
        return record.model_copy(update={"state": "READY", "state_since": at, "update_time": at})

    def _save(self, before: DeploymentRecord, after: DeploymentRecord) -> DeploymentRecord:
        if after != before:
            self._deployments.replace(after.deployment_id, after)
        return after

    @contextmanager
    def _resets(self) -> Iterator[list[str]]:
        # Deployments appended to the list are reported to the hooks after the transaction
        # commits (outside the store's lock), so the hooks see the new state.
        reset: list[str] = []
        with self._store.transaction():
            yield reset
            for deployment_id in reset:
                self._store.after_commit(partial(self._fire_reset, deployment_id))

    def _fire_reset(self, deployment_id: str) -> None:
        for hook in self._reset_hooks:
            try:
                hook(deployment_id)
            except Exception:
                # A broken hook must not fail the request that triggered it.
                logger.exception("on_deployment_reset hook failed for %s", deployment_id)


def _mask_fields(update_mask: str) -> list[str]:
    """`updateMask` paths (snake_case as the SDK sends; camelCase accepted) → field names."""
    paths = [path.strip() for path in update_mask.split(",") if path.strip()]
    unknown = [path for path in paths if to_snake(path) not in MUTABLE_FIELDS]
    if unknown:
        raise ApiError.invalid_argument(
            f"updateMask names unknown or immutable field(s): {', '.join(unknown)}; "
            f"mutable fields: {', '.join(sorted(MUTABLE_FIELDS))}"
        )
    return [to_snake(path) for path in paths]


def _merged(spec: DeploymentCreate, patch: DeploymentPatch, fields: list[str]) -> DeploymentCreate:
    """`spec` with `fields` taken from `patch`; a masked field absent from it gets its default."""
    defaults = DeploymentCreate.model_fields
    changes: dict[str, Any] = {}
    for field in fields:
        value = getattr(patch, field) if field in patch.model_fields_set else None
        changes[field] = defaults[field].default if value is None else value
    try:
        return DeploymentCreate.model_validate({**spec.model_dump(), **changes})
    except ValidationError as exc:
        raise ApiError.invalid_argument(describe_validation_errors(exc.errors())) from exc


def deployments_router(service: DeploymentService, check_account: AccountCheck) -> APIRouter:
    """Create, get, delete and patch under `/v1/accounts/{account}/deployments`."""
    router = APIRouter(
        prefix="/v1/accounts/{account}/deployments", dependencies=[Depends(check_account)]
    )

    @router.post("", response_model_exclude_none=True)
    def create_deployment(
        body: DeploymentCreate,
        deployment_id: Annotated[str | None, Query(alias="deploymentId")] = None,
        skip_shape_validation: Annotated[bool, Query(alias="skipShapeValidation")] = False,
        disable_speculative_decoding: Annotated[
            bool, Query(alias="disableSpeculativeDecoding")
        ] = False,
    ) -> Deployment:
        # Both flags are accepted for compatibility; the local platform has no shape
        # validation to skip and no speculative decoding to disable.
        return service.create(body, deployment_id)

    @router.get("/{deployment_id}", response_model_exclude_none=True)
    def get_deployment(deployment_id: str) -> Deployment:
        return service.get(deployment_id)

    @router.patch("/{deployment_id}", response_model_exclude_none=True)
    def update_deployment(
        deployment_id: str,
        body: DeploymentPatch,
        update_mask: Annotated[str | None, Query(alias="updateMask")] = None,
    ) -> Deployment:
        return service.update(deployment_id, body, update_mask)

    @router.delete("/{deployment_id}", response_model_exclude_none=True)
    def delete_deployment(
        deployment_id: str,
        ignore_checks: Annotated[bool, Query(alias="ignoreChecks")] = False,
        hard: Annotated[bool, Query()] = False,
    ) -> Empty:
        # Deletion is always hard locally (the SDK always asks for it): the row is removed and
        # the id can be reused, which is what `create_or_get(force_recreate=True)` waits for.
        service.delete(deployment_id)
        return Empty()

    return router
