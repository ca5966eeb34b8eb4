"""Checkpoint rows of trainer jobs (the checkpoint list): recorded by the trainer, paged by clients.

The rows are the control plane's durable record of what a job saved: clients page them (oldest
first) to find the newest resumable checkpoint after a reconnect, for live and deleted jobs alike.
The trainer calls `record_checkpoint` once a save is complete on disk.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Depends, Query

from backend.control import AccountCheck, Clock, ResponseModel, rfc3339
from backend.control.jobs import TrainerJobService
from backend.errors import ApiError
from backend.store import CheckpointRow, Store

CheckpointType = Literal[
    "CHECKPOINT_TYPE_TRAINING",
    "CHECKPOINT_TYPE_TRAINING_LORA",
    "CHECKPOINT_TYPE_INFERENCE_BASE",
    "CHECKPOINT_TYPE_INFERENCE_LORA",
    "CHECKPOINT_TYPE_INFERENCE_ARC_V2",
]
# Training states are resumable, not promotable; full and LoRA sampler exports are
# promotable; an arc_v2 delta is not (it means nothing without its base).
PROMOTABLE_TYPES: frozenset[str] = frozenset(
    {"CHECKPOINT_TYPE_INFERENCE_BASE", "CHECKPOINT_TYPE_INFERENCE_LORA"}
)
DEFAULT_PAGE_SIZE = 200
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "after:"


class Checkpoint(ResponseModel):
    name: str
    create_time: str
    update_time: str
    checkpoint_type: CheckpointType
    promotable: bool


class CheckpointList(ResponseModel):
    checkpoints: list[Checkpoint]
    next_page_token: str | None = None


class CheckpointService:
    """Records checkpoint rows for jobs and pages them in insertion order."""

    def __init__(self, store: Store, clock: Clock, jobs: TrainerJobService) -> None:
        self._store = store
        self._clock = clock
        self._jobs = jobs

    def record_checkpoint(
        self, job_id: str, name: str, checkpoint_type: CheckpointType
    ) -> Checkpoint:
        """Add a row (or refresh the row of the same name); promotable follows from the type."""
        if checkpoint_type not in get_args(CheckpointType):
            accepted = ", ".join(get_args(CheckpointType))
            raise ValueError(f"checkpoint_type {checkpoint_type!r} is not one of: {accepted}")
        if not name or "/" in name:
            raise ValueError(f"checkpoint name {name!r} must be one non-empty path segment")
        if self._jobs.find(job_id) is None:
            raise ValueError(f"no trainer job {job_id!r} to record checkpoint {name!r} for")
        promotable = checkpoint_type in PROMOTABLE_TYPES
        row = self._store.upsert_checkpoint(
            job_id, name, checkpoint_type, promotable, self._clock()
        )
        return self._to_wire(row)

    def list_page(self, job_id: str, page_size: int, page_token: str) -> CheckpointList:
        self._jobs.require(job_id)  # 404 for a job that never existed; tombstones are listable
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # One extra row tells whether another page follows, so the last page has no token.
        rows = self._store.list_checkpoints(job_id, _decode_token(page_token), size + 1)
        page = rows[:size]
        token = _encode_token(page[-1].seq) if len(rows) > size else None
        return CheckpointList(
            checkpoints=[self._to_wire(row) for row in page], next_page_token=token
        )

    def _to_wire(self, row: CheckpointRow) -> Checkpoint:
        return Checkpoint.model_validate(
            {
                "name": f"{self._jobs.job_name(row.job_id)}/checkpoints/{row.name}",
                "create_time": rfc3339(row.create_time),
                "update_time": rfc3339(row.update_time),
                "checkpoint_type": row.checkpoint_type,
                "promotable": row.promotable,
            }
        )


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{seq}".encode()).decode()


def _decode_token(token: str) -> int:
    """The `seq` after which the page starts (0 for the first page)."""
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if text.startswith(_TOKEN_PREFIX):
            return int(text.removeprefix(_TOKEN_PREFIX))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ApiError.invalid_argument(
        f"pageToken {token!r} is invalid: pass the nextPageToken of the previous page"
    )


def checkpoints_router(service: CheckpointService, check_account: AccountCheck) -> APIRouter:
    """The checkpoint list: `GET /v1/accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints`."""
    router = APIRouter(
        prefix="/v1/accounts/{account}/rlorTrainerJobs", dependencies=[Depends(check_account)]
    )

    @router.get("/{job_id}/checkpoints", response_model_exclude_none=True)
    def list_checkpoints(
        job_id: str,
        page_size: Annotated[int, Query(alias="pageSize", ge=0)] = 0,
        page_token: Annotated[str, Query(alias="pageToken")] = "",
    ) -> CheckpointList:
        return service.list_page(job_id, page_size, page_token)

    return router
