"""Hotload: load a trainer's sampler snapshot onto a deployment's replica.

`POST /hot_load/v1/models/hot_load` checks everything it can before any load and answers a
clear 4xx: the headers name a deployment of this account and its base model, the deployment is
linked to a trainer (`hotLoadTrainerJob`), the identity is a complete snapshot of that trainer
(`<data_dir>/jobs/<job>/snapshots/<identity>`), made from the same base model, and delta
metadata uses the two literal formats. It then answers `{"identity", "accepted": true}` and
loads on a thread: `downloading`, `loading` (the chain checks, the weights are written into the
replica's standby model while another thread verifies every file's digest), then, once both
succeeded, the swap, `completed` and, a little later, `idle`. What can only be judged against
the replica's current weights (a delta's base) fails as stage `error` naming both identities,
and the previous weights keep serving. `GET` reports the replica, or an empty `replicas` list
until one is up; a local extension lets a client ask it to hold the answer while a load of a
given identity runs (`status(wait_for=...)`), so a waiting client learns the end of a load when
it happens instead of at its next poll.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.control.deployments import DeploymentRecord
from backend.errors import ApiError, GrpcCode
from backend.models.registry import UnknownModelError, canonical_model_name
from backend.serving.runtime import (
    Replica,
    ReplicaBusyError,
    ReplicaStoppedError,
    ServingRuntime,
)
from backend.trainer.atomic import MARKER_NAME, verify_complete
from backend.trainer.checkpoints import CheckpointStore, validate_name
from backend.trainer.errors import UserError

if TYPE_CHECKING:
    from backend.serving.generation import DecodingModel
    from backend.serving.weights import SnapshotInfo

logger = logging.getLogger(__name__)

COMPRESSION_FORMAT = "arc_v2"
CHECKSUM_FORMAT = "alder32"  # sic: the real platform's literal
_SNAPSHOT_META = "snapshot.json"
# The longest a status request is held for a load to end: short enough for any HTTP timeout
# and any client deadline (the client re-asks), long enough that most loads end within it.
MAX_STATUS_HOLD_S = 2.0


class IncrementalSnapshotMetadata(BaseModel):
    """What a delta hotload says about its base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    previous_snapshot_identity: str
    compression_format: str
    checksum_format: str


class HotloadRequest(BaseModel):
    """The hotload POST body; unknown fields → 400 "extra inputs are not permitted" (the SDK
    relies on that text to drop `reset_prompt_cache` for servers without it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: str = Field(min_length=1)
    # Every swap resets every cache whatever this says: a cache must not outlive its weights.
    reset_prompt_cache: bool = True
    incremental_snapshot_metadata: IncrementalSnapshotMetadata | None = None


class HotloadAccepted(BaseModel):
    identity: str
    accepted: bool = True


class LoadingStateWire(BaseModel):
    stage: Literal["idle", "downloading", "loading", "completed", "error"]
    target_snapshot_identity: str
    message: str | None = None


class LoadedAdapter(BaseModel):
    identity: str
    status: Literal["loaded"] = "loaded"


class ReplicaStatus(BaseModel):
    """One replica. `identity` names the pod (new on every restart, which is how the SDK's
    `reattach_trainer` sees a re-attach settle); the snapshot is `current_snapshot_identity`."""

    identity: str
    current_snapshot_identity: str
    readiness: bool
    loading_state: LoadingStateWire
    loaded_adapters: list[LoadedAdapter]
    weight_version: int


class HotloadStatus(BaseModel):
    replicas: list[ReplicaStatus]


class HotloadService:
    """Hotload load and status over the serving runtime and the trainers' snapshot directories."""

    def __init__(self, runtime: ServingRuntime, data_dir: Path) -> None:
        self._runtime = runtime
        self._deployments = runtime.deployments
        self._snapshots = CheckpointStore(data_dir)
        # Deployment id → the completion marker's (mtime, size) of the snapshot it serves: a
        # snapshot saved again under the same name (the published SDK overwrites re-used names)
        # is loaded again, not taken for the one already served.
        self._served_markers: dict[str, tuple[int, int]] = {}

    def status(
        self,
        deployment: str | None,
        model: str | None,
        *,
        wait_for: str | None = None,
        wait_s: float = MAX_STATUS_HOLD_S,
    ) -> HotloadStatus:
        """The status; with `wait_for` (an identity), answered once no load of it is in
        progress any more, or after `wait_s` (at most `MAX_STATUS_HOLD_S`) at the latest."""
        record = self._target(deployment, model)
        replica = self._runtime.replica(record.deployment_id)
        if replica is None and record.spec.max_replica_count > 0:
            # E.g. after a platform restart: the pod comes back; until then no replicas.
            self._runtime.ensure_replica(record.deployment_id, record.spec.base_model)
        if replica is None or not replica.serving:
            return HotloadStatus(replicas=[])
        if wait_for:
            replica.wait_load_of(wait_for, min(max(wait_s, 0.0), MAX_STATUS_HOLD_S))
        state = replica.stage(self._runtime.settings.completed_hold_s)
        wire_state = LoadingStateWire(
            stage=state.stage, target_snapshot_identity=state.target, message=state.message or None
        )
        return HotloadStatus(
            replicas=[
                ReplicaStatus(
                    identity=replica.name,
                    current_snapshot_identity=replica.identity,
                    readiness=replica.ready,
                    loading_state=wire_state,
                    loaded_adapters=[LoadedAdapter(identity=a) for a in replica.adapters],
                    weight_version=replica.version,
                )
            ]
        )

    def load(
        self, deployment: str | None, model: str | None, body: HotloadRequest
    ) -> HotloadAccepted:
        record = self._target(deployment, model)
        _check_formats(body.incremental_snapshot_metadata)
        snapshot_dir = self._snapshot_dir(record, body.identity)
        replica = self._runtime.replica(record.deployment_id)
        if replica is None or not replica.serving:
            if replica is None:
                self._runtime.ensure_replica(record.deployment_id, record.spec.base_model)
            raise ApiError.unavailable(
                f"deployment {self._deployments.name(record.deployment_id)!r} has no replica up "
                "yet; wait until the hotload status lists one, then retry",
                reason="REPLICA_NOT_READY",
            )
        served = self._served_markers.get(record.deployment_id)
        if body.identity == replica.identity and replica.ready and served == _marker(snapshot_dir):
            return HotloadAccepted(identity=body.identity)  # already served: nothing to do
        try:
            started = replica.begin_load(body.identity)
        except ReplicaBusyError as busy:
            raise ApiError(
                409,
                GrpcCode.ABORTED,
                f"a hotload of {str(busy)!r} is in progress on deployment "
                f"{self._deployments.name(record.deployment_id)!r}; wait for it, then retry",
                "HOTLOAD_IN_PROGRESS",
            ) from None
        if started:
            threading.Thread(
                target=self._run_load,
                args=(replica, snapshot_dir, body),
                name=f"hotload-{replica.name}",
                daemon=True,
            ).start()
        return HotloadAccepted(identity=body.identity)

    # -- checks before any load -----------------------------------------------------------------

    def _target(self, deployment: str | None, model: str | None) -> DeploymentRecord:
        """The deployment named by the headers, its base model checked against theirs."""
        if not deployment:
            raise ApiError.invalid_argument(
                "header fireworks-deployment is required: accounts/<account>/deployments/<id>"
            )
        if not model:
            raise ApiError.invalid_argument(
                "header fireworks-model is required: the deployment's base model"
            )
        prefix = f"accounts/{self._deployments.account_id}/deployments/"
        deployment_id = deployment.removeprefix(prefix)
        if not deployment.startswith(prefix) or not deployment_id or "/" in deployment_id:
            raise ApiError.invalid_argument(
                f"header fireworks-deployment {deployment!r} is invalid: expected {prefix}<id>"
            )
        record = self._deployments.find(deployment_id)
        if record is None:
            raise ApiError.not_found(
                f"deployment {deployment!r} not found", reason="DEPLOYMENT_NOT_FOUND"
            )
        try:
            same = canonical_model_name(model) == canonical_model_name(record.spec.base_model)
        except UnknownModelError as exc:
            raise ApiError.invalid_argument(f"header fireworks-model: {exc}") from None
        if not same:
            raise ApiError.invalid_argument(
                f"header fireworks-model names base model {model!r}, but deployment "
                f"{deployment!r} serves {record.spec.base_model!r}"
            )
        return record

    def _snapshot_dir(self, record: DeploymentRecord, identity: str) -> Path:
        """The complete snapshot `identity` of the deployment's trainer, same base model."""
        name = self._deployments.name(record.deployment_id)
        job_name = record.spec.hot_load_trainer_job
        if not job_name:
            raise ApiError.failed_precondition(
                f"deployment {name!r} has no hotLoadTrainerJob: link it to the trainer whose "
                "snapshots it should load (PATCH hotLoadTrainerJob)",
                reason="NO_TRAINER_LINKED",
            )
        job_id = job_name.rsplit("/", 1)[-1]
        try:
            directory = self._snapshots.snapshot_dir(job_id, validate_name(identity, "identity"))
        except UserError as exc:
            raise ApiError.invalid_argument(str(exc)) from None
        if not (directory / MARKER_NAME).is_file():
            owners = self._other_owners(identity, job_id)
            where = f"; it is a snapshot of trainer job(s) {', '.join(owners)}" if owners else ""
            raise ApiError.not_found(
                f"snapshot {identity!r} not found among the sampler snapshots of trainer job "
                f"{job_name!r}, which deployment {name!r} is linked to{where}",
                reason="SNAPSHOT_NOT_FOUND",
            )
        snapshot_model = _snapshot_base_model(directory)
        if _canonical_or_none(snapshot_model) != canonical_model_name(record.spec.base_model):
            raise ApiError.invalid_argument(
                f"snapshot {identity!r} was trained from base model {snapshot_model!r}, but "
                f"deployment {name!r} serves {record.spec.base_model!r}"
            )
        return directory

    def _other_owners(self, identity: str, job_id: str) -> list[str]:
        jobs_dir = self._snapshots.jobs_dir
        if not jobs_dir.is_dir():
            return []
        return sorted(
            path.name
            for path in jobs_dir.iterdir()
            if path.name != job_id and (path / "snapshots" / identity / MARKER_NAME).is_file()
        )

    # -- the load, on its own thread --------------------------------------------------------------

    def _run_load(self, replica: Replica, snapshot_dir: Path, body: HotloadRequest) -> None:
        identity, settings = body.identity, self._runtime.settings
        started = time.monotonic()
        try:
            marker = _marker(snapshot_dir)  # before reading: a later save must load again
            time.sleep(settings.load_delay_s)
            model, adapters = _verified_build(replica, snapshot_dir, body)
            _swap(replica, model, settings.drain_timeout_s)
        except UserError as exc:
            logger.warning(
                "deployment %s: hotload of %s failed: %s", replica.deployment_id, identity, exc
            )
            # The status is read by clients: paths in it are relative to the data directory.
            replica.fail_load(identity, self._snapshots.relative(str(exc)))
            return
        except ReplicaStoppedError:
            logger.info(
                "deployment %s: replica stopped during the hotload of %s",
                replica.deployment_id,
                identity,
            )
            return
        except Exception as exc:
            logger.exception("deployment %s: hotload of %s failed", replica.deployment_id, identity)
            replica.fail_load(identity, f"internal error while loading: {type(exc).__name__}")
            return
        version = self._runtime.next_version(replica.deployment_id)
        if not replica.finish_load(model, identity, adapters, version):
            return  # stopped right after the swap: the reset already emptied the identity
        # A deployment deleted meanwhile has nothing left to record the snapshot on.
        self._served_markers[replica.deployment_id] = marker
        with contextlib.suppress(ApiError):
            self._deployments.set_served_snapshot(replica.deployment_id, identity)
        logger.info(
            "deployment %s: serving %s (version %d) after %.2f s",
            replica.deployment_id,
            identity,
            replica.version,
            time.monotonic() - started,
        )


def _swap(replica: Replica, model: DecodingModel, drain_timeout_s: float) -> None:
    """Hand `model` to the replica's generation thread and wait until it serves."""
    loop = replica.loop
    if loop is None or replica.stopped:
        raise ReplicaStoppedError
    done = loop.swap(model)
    try:
        done.result(timeout=drain_timeout_s)
    except TimeoutError:
        if loop.withdraw_swap(done):
            raise UserError(
                f"requests admitted before the load did not finish within {drain_timeout_s:g} s"
            ) from None
        done.result()  # swapped at the last moment
    except RuntimeError as exc:  # the loop stopped: the replica is gone
        raise ReplicaStoppedError from exc


def _verified_build(
    replica: Replica, snapshot_dir: Path, body: HotloadRequest
) -> tuple[DecodingModel, tuple[str, ...]]:
    """`_build`, while another thread checks every file against the snapshot's marker (the
    "download"). Nothing built is returned unless every file matches, and a corrupt file is
    what gets reported, whatever error it caused in the build."""
    from backend.serving.weights import read_snapshot_info  # imports torch

    with ThreadPoolExecutor(1, thread_name_prefix=f"verify-{replica.name}") as pool:
        verified = pool.submit(verify_complete, snapshot_dir)
        try:
            info = read_snapshot_info(snapshot_dir, verify=False)
            replica.set_stage("loading")
            return _build(replica, snapshot_dir, info, body)
        finally:
            verified.result()  # raises UserError for a corrupt or incomplete snapshot


def _build(
    replica: Replica, snapshot_dir: Path, info: SnapshotInfo, body: HotloadRequest
) -> tuple[DecodingModel, tuple[str, ...]]:
    """The new model, after the checks that depend on what the replica serves now."""
    from backend.trainer import export  # imports torch

    factory, metadata, current = replica.factory, body.incremental_snapshot_metadata, replica.model
    if factory is None or current is None:
        raise ReplicaStoppedError
    if info.kind == "delta":
        if metadata is None:
            raise UserError(
                f"snapshot {info.identity!r} is a delta against {info.previous_identity!r} and "
                "cannot be applied without incremental_snapshot_metadata naming its base; "
                "hotload a base snapshot instead"
            )
        served = replica.identity or "(base weights, no snapshot)"
        if metadata.previous_snapshot_identity != replica.identity:
            raise UserError(
                f"delta {info.identity!r} applies to {metadata.previous_snapshot_identity!r}, but "
                f"the replica serves {served!r}; hotload a base snapshot to restart the chain"
            )
        if info.previous_identity != metadata.previous_snapshot_identity:
            raise UserError(
                f"delta {info.identity!r} was saved against {info.previous_identity!r}, but "
                f"incremental_snapshot_metadata names {metadata.previous_snapshot_identity!r}"
            )
        return factory.delta(current, snapshot_dir, info, replica.standby_model()), ()
    if metadata is not None:
        what = "a LoRA adapter" if info.kind == "adapter" else "full weights"
        raise UserError(
            f"snapshot {info.identity!r} holds {what}: load it without "
            "incremental_snapshot_metadata (only deltas take it)"
        )
    if info.kind == "adapter":
        standby = replica.standby_model()
        try:
            return factory.adapter(snapshot_dir, standby), (info.identity,)
        except BaseException:
            replica.drop_standby()  # it may hold LoRA layers now: the next load builds anew
            raise
    tensors = export.load_full_tensors(snapshot_dir)
    return factory.full(tensors, snapshot_dir, replica.standby_model()), ()


def _check_formats(metadata: IncrementalSnapshotMetadata | None) -> None:
    if metadata is None:
        return
    if metadata.compression_format != COMPRESSION_FORMAT:
        raise ApiError.invalid_argument(
            "incremental_snapshot_metadata.compression_format must be "
            f"{COMPRESSION_FORMAT!r}, got {metadata.compression_format!r}"
        )
    if metadata.checksum_format != CHECKSUM_FORMAT:
        raise ApiError.invalid_argument(
            "incremental_snapshot_metadata.checksum_format must be "
            f"{CHECKSUM_FORMAT!r} (sic), got {metadata.checksum_format!r}"
        )


def _snapshot_base_model(directory: Path) -> str:
    try:
        meta = json.loads((directory / _SNAPSHOT_META).read_text(encoding="utf-8"))
        return str(meta["base_model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApiError.invalid_argument(
            f"snapshot {directory.name!r} has no readable {_SNAPSHOT_META}: {exc}"
        ) from None


def _canonical_or_none(name: str) -> str | None:
    try:
        return canonical_model_name(name)
    except UnknownModelError:
        return None


def _marker(snapshot_dir: Path) -> tuple[int, int]:
    """(mtime, size) of the snapshot's completion marker: it changes whenever it is saved again."""
    stat = (snapshot_dir / MARKER_NAME).stat()
    return stat.st_mtime_ns, stat.st_size
