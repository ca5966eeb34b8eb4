"""Checkpoint promotion on the local platform: a saved checkpoint becomes a model you can take away.

`POST /v1/accounts/{a}/checkpoints/{c}:promote` (snake_case body) writes the checkpoint with the
same function as `fireloop export` into the platform's model registry,
`<data_dir>/promoted/<model id>/` (beside the files, `model.json` is the model as answered), and
answers `{"model": {...}}` at once, READY: a local export takes seconds, so no operation is needed.

What can be promoted: full and LoRA sampler snapshots (rows typed INFERENCE_BASE / _LORA); never a
delta snapshot, which means nothing without the snapshot before it. A full-parameter run hotloads
deltas after its first snapshot, so the local platform also promotes a job's resumable training
states by name (their rows keep `promotable: false`, as the platform API lists them): the state
holds every weight, and its export is exactly `fireloop export` of that step.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict

from backend.control import AccountCheck, Clock, ResponseModel, rfc3339
from backend.control.jobs import TrainerJobService
from backend.errors import ApiError
from backend.models.registry import UnknownModelError, canonical_model_name
from backend.store import CheckpointRow, Store

__all__ = ["PROMOTED_SUBDIR", "PromoteRequest", "PromotionService", "promotion_router"]

PROMOTED_SUBDIR = "promoted"
MODEL_FILE = "model.json"
_MODEL_ID = re.compile(r"^[a-z0-9-]{1,63}$")
_STATE_TYPES = frozenset({"CHECKPOINT_TYPE_TRAINING", "CHECKPOINT_TYPE_TRAINING_LORA"})
_SNAPSHOT_TYPES = frozenset({"CHECKPOINT_TYPE_INFERENCE_BASE", "CHECKPOINT_TYPE_INFERENCE_LORA"})
# Rows per page when looking a checkpoint up by name.
_ROWS_PAGE = 1000

ModelKind = Literal["HF_BASE_MODEL", "HF_PEFT_ADDON"]


class PromoteRequest(BaseModel):
    """The promote request body: snake_case on the wire (the one control-plane body that is)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_model: str
    trainer_job_id: str
    base_model: str | None = None
    hot_load_deployment_id: str | None = None
    # Accepted for the client's sake; the local promotion always completes in the request.
    async_promotion: bool = False


class PeftDetails(ResponseModel):
    base_model: str
    r: int
    target_modules: list[str]


class PromotedModel(ResponseModel):
    name: str
    state: Literal["READY"] = "READY"
    kind: ModelKind
    base_model: str | None = None
    peft_details: PeftDetails | None = None
    create_time: str
    update_time: str
    # The registry directory holding the model's files (a local-platform extra).
    local_path: str


class PromoteResponse(ResponseModel):
    model: PromotedModel


class PromotionService:
    """Writes promoted checkpoints into `<data_dir>/promoted/`; one promotion at a time."""

    def __init__(
        self,
        *,
        account_id: str,
        data_dir: Path,
        models_dir: Path,
        store: Store,
        jobs: TrainerJobService,
        clock: Clock,
    ) -> None:
        self._account_id = account_id
        self._data_dir = data_dir
        self._models_dir = models_dir
        self._store = store
        self._jobs = jobs
        self._clock = clock
        self.registry_dir = data_dir / PROMOTED_SUBDIR
        self._lock = threading.Lock()

    def promote(self, checkpoint: str, request: PromoteRequest) -> PromotedModel:
        """Export checkpoint `checkpoint` of the request's job as model `output_model`."""
        model_id = self._model_id(request.output_model)
        job_id = self._job_id(request.trainer_job_id)
        job = self._jobs.require(job_id)
        base_model = job.spec.training_config.base_model
        self._check_base_model(request.base_model, base_model)
        row = self._row(job_id, checkpoint)
        source = self._source_dir(row)
        with self._lock:
            target = self.registry_dir / model_id
            if target.exists():
                raise ApiError.already_exists(
                    f"model accounts/{self._account_id}/models/{model_id} already exists "
                    f"(at {PROMOTED_SUBDIR}/{model_id} in the data directory); choose another "
                    "output_model"
                )
            return self._write(source, target, model_id, base_model)

    def find(self, model_id: str) -> PromotedModel | None:
        """The promoted model `model_id` as it was answered, or None when there is none."""
        if not _MODEL_ID.match(model_id):
            return None
        model_file = self.registry_dir / model_id / MODEL_FILE
        if not model_file.is_file():
            return None
        return PromotedModel.model_validate_json(model_file.read_text())

    def _write(self, source: Path, target: Path, model_id: str, base_model: str) -> PromotedModel:
        # torch and transformers load only when a promotion happens.
        from backend.export import adapter_target_modules, write_export
        from backend.models.store import ensure_model_dir
        from backend.trainer.atomic import atomic_directory
        from backend.trainer.checkpoints import CheckpointStore
        from backend.trainer.errors import UserError

        base_dir = ensure_model_dir(base_model, self._models_dir)
        try:
            with atomic_directory(target) as tmp_dir:
                result = write_export(source, base_dir, tmp_dir)
                now = rfc3339(self._clock())
                base_name = f"accounts/{self._account_id}/models/{canonical_model_name(base_model)}"
                peft = None
                if result.kind == "lora":
                    lora_rank = int(json.loads((tmp_dir / "adapter_config.json").read_text())["r"])
                    peft = PeftDetails(
                        base_model=base_name,
                        r=lora_rank,
                        target_modules=adapter_target_modules(tmp_dir),
                    )
                model = PromotedModel(
                    name=f"accounts/{self._account_id}/models/{model_id}",
                    kind="HF_PEFT_ADDON" if peft is not None else "HF_BASE_MODEL",
                    base_model=base_name,
                    peft_details=peft,
                    create_time=now,
                    update_time=now,
                    local_path=str(target),
                )
                (tmp_dir / MODEL_FILE).write_text(
                    model.model_dump_json(by_alias=True, exclude_none=True, indent=1)
                )
        except UserError as exc:  # incomplete or corrupt files: the request cannot succeed
            # The export names the files it read; a client sees them relative to the data dir.
            shown = CheckpointStore(self._data_dir, models_dir=self._models_dir).relative(str(exc))
            raise ApiError.failed_precondition(f"cannot promote {source.name!r}: {shown}") from exc
        return model

    def _model_id(self, output_model: str) -> str:
        prefix = f"accounts/{self._account_id}/models/"
        model_id = output_model.removeprefix(prefix)
        if "/" in model_id or not _MODEL_ID.match(model_id):
            raise ApiError.invalid_argument(
                f"output_model {output_model!r} must be {prefix}<id> with an id of 1-63 "
                "lowercase letters, digits or '-'"
            )
        return model_id

    def _job_id(self, trainer_job_id: str) -> str:
        prefix = f"accounts/{self._account_id}/rlorTrainerJobs/"
        job_id = trainer_job_id.removeprefix(prefix)
        if not job_id or "/" in job_id:
            raise ApiError.invalid_argument(
                f"trainer_job_id {trainer_job_id!r} must be {prefix}<job id>"
            )
        return job_id

    def _check_base_model(self, requested: str | None, job_base_model: str) -> None:
        if requested is None or not requested.strip():
            return
        try:
            same = canonical_model_name(requested) == canonical_model_name(job_base_model)
        except UnknownModelError as exc:
            raise ApiError.invalid_argument(f"base_model: {exc}") from exc
        if not same:
            raise ApiError.invalid_argument(
                f"base_model {requested!r} is not the job's base model {job_base_model!r}"
            )

    def _row(self, job_id: str, checkpoint: str) -> CheckpointRow:
        rows: list[CheckpointRow] = []
        after = 0
        while page := self._store.list_checkpoints(job_id, after, _ROWS_PAGE):
            rows.extend(page)
            after = page[-1].seq
        for row in rows:
            if row.name == checkpoint:
                if row.checkpoint_type in _STATE_TYPES | _SNAPSHOT_TYPES:
                    return row
                raise ApiError.failed_precondition(
                    f"checkpoint {checkpoint!r} of job {job_id} is {row.checkpoint_type}: a delta "
                    "snapshot is not promotable; promote a base snapshot or the training state "
                    "saved at that step",
                    reason="CHECKPOINT_NOT_PROMOTABLE",
                )
        names = ", ".join(row.name for row in rows) or "none"
        raise ApiError.not_found(
            f"checkpoint {checkpoint!r} of trainer job {job_id} not found; its checkpoints: {names}"
        )

    def _source_dir(self, row: CheckpointRow) -> Path:
        kind = "checkpoints" if row.checkpoint_type in _STATE_TYPES else "snapshots"
        source = self._data_dir / "jobs" / row.job_id / kind / row.name
        if not source.is_dir():
            raise ApiError.failed_precondition(
                f"checkpoint {row.name!r} of job {row.job_id} is listed but its files are gone"
            )
        return source


def promotion_router(service: PromotionService, check_account: AccountCheck) -> APIRouter:
    """The promote route: `POST /v1/accounts/{account}/checkpoints/{checkpoint}:promote`."""
    router = APIRouter(
        prefix="/v1/accounts/{account}/checkpoints", dependencies=[Depends(check_account)]
    )

    # A custom verb (AIP-136): the literal `:promote` follows the path parameter.
    @router.post("/{checkpoint}:promote", response_model_exclude_none=True)
    def promote(
        checkpoint: Annotated[str, PathParam(min_length=1)], request: PromoteRequest
    ) -> PromoteResponse:
        return PromoteResponse(model=service.promote(checkpoint, request))

    return router
