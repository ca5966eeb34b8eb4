"""What one running trainer job holds in memory: its fixed context and its models.

Shared by the service (which creates and looks these up on request threads) and the operations
(which run on the job's worker thread). Kept free of torch so the platform imports quickly;
the engine is loaded with the first model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from backend.trainer.checkpoints import CheckpointStore
from backend.trainer.errors import UserError
from backend.trainer.sequencer import ModelSequencer
from backend.trainer.settings import EngineSettings

if TYPE_CHECKING:
    from backend.trainer.engine import TrainableModel

__all__ = ["CheckpointRowType", "JobContext", "ModelEntry", "TrainerHost", "check_lora_capacity"]

# The control plane's checkpoint types.
CheckpointRowType = Literal[
    "CHECKPOINT_TYPE_TRAINING",
    "CHECKPOINT_TYPE_TRAINING_LORA",
    "CHECKPOINT_TYPE_INFERENCE_BASE",
    "CHECKPOINT_TYPE_INFERENCE_LORA",
    "CHECKPOINT_TYPE_INFERENCE_ARC_V2",
]


class TrainerHost(Protocol):
    """What the trainer needs from the platform it runs in (`PlatformState` provides it)."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def models_dir(self) -> Path:
        """The shared, read-only cache of built base models."""
        ...

    def record_checkpoint(
        self, job_id: str, name: str, checkpoint_type: CheckpointRowType
    ) -> object:
        """Publish a completed save as a control-plane checkpoint row."""
        ...

    def record_optim_step(self, job_id: str, count: int) -> bool:
        """Report the optimizer step count (it may preempt the job: fault injection)."""
        ...

    def on_job_lost(self, callback: Callable[[str], None]) -> None:
        """Register `callback(job_id)` for jobs leaving RUNNING."""
        ...


@dataclass(frozen=True)
class JobContext:
    """The fixed facts of one trainer job, as its operations need them."""

    job_id: str
    base_model: str  # canonical registry name: what checkpoints record
    lora_rank: int  # the job's LoRA rank; 0 = full-parameter
    context_length: int  # the job's max_context_length
    device: str  # `auto`, `cpu`, `cuda`, …: resolved when a model loads
    host: TrainerHost
    checkpoints: CheckpointStore
    model_owner: Callable[[str], str | None]  # model id → job id, for tinker://<model>/… paths
    # (session id, sampling session seq id, snapshot path) → a new sampling session's id
    register_sampler: Callable[[str, int, str], str]
    engine: EngineSettings = field(default_factory=EngineSettings)  # the compute path


@dataclass
class ModelEntry:
    """One model of a session: registered at `create_model`, loaded by the worker.

    `last_snapshot` is the previous `base`/`delta` sampler snapshot of this model: the base a
    `delta` export XORs against.
    """

    model_id: str
    session_id: str
    requested_base_model: str  # as the client spelled it (get_info echoes it)
    base_only: bool
    lora_rank: int
    sequencer: ModelSequencer
    engine: TrainableModel | None = None
    failure: str | None = None
    unloaded_because: str | None = None
    last_snapshot: Path | None = field(default=None)

    def require_engine(self) -> TrainableModel:
        """The loaded engine, or a `UserError` saying why the model cannot be used."""
        if self.unloaded_because is not None:
            raise UserError(f"model {self.model_id!r} was unloaded: {self.unloaded_because}")
        if self.failure is not None:
            raise UserError(f"model {self.model_id!r} failed to load: {self.failure}")
        if self.engine is None:
            raise UserError(f"model {self.model_id!r} is not loaded")
        return self.engine

    def unload(self, reason: str) -> None:
        """Drop the engine (its memory goes with the last reference); later operations fail."""
        self.unloaded_because = reason
        self.engine = None


def check_lora_capacity(rank: int, job_rank: int) -> None:
    """Refuse a training client's LoRA rank that the job cannot hold (`UserError`).

    A LoRA job's rank is a capacity, as the Fireworks SDK treats it: any rank from 1 to it,
    and several such clients on one trainer. A full-parameter job (rank 0) takes only
    full-parameter clients, and a LoRA job no full-parameter one; frozen references
    (`base_only`) fit either and are not checked here.
    """
    if job_rank == 0 and rank > 0:
        raise UserError(
            f"lora_config.rank {rank} needs a LoRA trainer job, but this job is full-parameter "
            "(lora_rank 0); create the job with lora_rank >= the client's rank, or the client "
            "with lora_rank=0"
        )
    if job_rank > 0 and rank == 0:
        raise UserError(
            f"lora_config.rank 0 (full-parameter) does not fit this LoRA trainer job "
            f"(lora_rank {job_rank}); create the client with 1 <= lora_rank <= {job_rank}, "
            "or as a base-only reference"
        )
    if rank > job_rank:
        raise UserError(
            f"lora_config.rank {rank} is larger than this trainer job's lora_rank {job_rank} "
            f"(its LoRA capacity); create the client with 1 <= lora_rank <= {job_rank}"
        )
