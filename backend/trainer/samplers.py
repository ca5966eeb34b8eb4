"""Sampling sessions of a trainer job: which weights a stock tinker sampler reads.

A sampling session names its source once (`create_sampling_session`): a sampler snapshot of
the job (`tinker://<job>/sampler_weights/<name>`, or any reference `CheckpointStore` resolves to
a snapshot) or the job's base model. `asample` requests refer to the session, or name a source
themselves. Resolution is cheap and torch-free; loading the weights happens on the worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from backend.models.registry import UnknownModelError, canonical_model_name
from backend.trainer.atomic import MARKER_NAME
from backend.trainer.errors import UserError
from backend.trainer.job import JobContext

__all__ = ["SamplerInfo", "SamplerSessions"]


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler's source: the base model, plus the snapshot directory unless sampling it."""

    sampler_id: str
    base_model: str
    model_path: str | None
    snapshot_dir: Path | None


class SamplerSessions:
    """Sampling sessions by id, and resolution of `asample` requests to a source."""

    def __init__(self, context: JobContext, base_model_name: str) -> None:
        self._context = context
        self._base_model_name = base_model_name  # as the job spells it
        self._sessions: dict[str, SamplerInfo] = {}
        self._lock = threading.Lock()

    def create(
        self, session_id: str, seq_id: int, base_model: str | None, model_path: str | None
    ) -> str:
        """Register session `{session_id}:sample:{seq_id}` (idempotent); UserError if bad."""
        sampler_id = f"{session_id}:sample:{seq_id}"
        with self._lock:
            if sampler_id in self._sessions:
                return sampler_id
        info = self.resolve(sampler_id, base_model, model_path)
        with self._lock:
            self._sessions.setdefault(sampler_id, info)
        return sampler_id

    def get(self, sampler_id: str) -> SamplerInfo:
        """The session's source; KeyError for an unknown id."""
        with self._lock:
            info = self._sessions.get(sampler_id)
        if info is None:
            raise KeyError(f"unknown sampling session {sampler_id!r}")
        return info

    def resolve(
        self, sampler_id: str, base_model: str | None, model_path: str | None
    ) -> SamplerInfo:
        """The source named by `model_path` (a snapshot) or `base_model` (this job's)."""
        if model_path:
            ref = self._context.checkpoints.resolve(
                model_path, job_id=self._context.job_id, model_owner=self._context.model_owner
            )
            if ref.kind != "snapshot":
                raise UserError(
                    f"model_path {model_path!r} is a training state; sample from a sampler "
                    "snapshot (save_weights_for_sampler) instead"
                )
            if not (ref.path / MARKER_NAME).is_file():
                raise UserError(f"model_path {model_path!r}: no complete sampler snapshot there")
            return SamplerInfo(sampler_id, self._base_model_name, model_path, ref.path)
        if not base_model:
            raise UserError("sampling needs model_path or base_model")
        try:
            matches = canonical_model_name(base_model) == self._context.base_model
        except UnknownModelError as exc:
            raise UserError(f"base_model: {exc}") from None
        if not matches:
            raise UserError(
                f"base_model {base_model!r} does not match this trainer job's base model "
                f"{self._context.base_model!r}"
            )
        return SamplerInfo(sampler_id, base_model, None, None)
