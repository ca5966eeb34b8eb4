"""Value types of the Firetitan training client that do not depend on tinker.

They are importable (and picklable, for Prefect task results) without loading tinker and torch;
the clients themselves live in `sdk.firetitan` and `sdk.firetitan_training`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "CHECKPOINT_TYPES",
    "CheckpointType",
    "GradAccNormalization",
    "GradNormMetricsMode",
    "LoadAdapterResponse",
    "SaveSamplerResult",
]

CheckpointType = Literal["base", "delta", "merged_base"]
CHECKPOINT_TYPES: tuple[CheckpointType, ...] = ("base", "delta", "merged_base")


class GradAccNormalization(StrEnum):
    """How `optim_step` normalises the gradient accumulated since the previous step."""

    NUM_LOSS_TOKENS = "num_loss_tokens"
    """Divide by the number of loss tokens (non-zero loss mask): a per-token mean."""
    NUM_SEQUENCES = "num_sequences"
    """Divide by the number of datums: a per-sequence mean."""
    NONE = "none"
    """Use the summed gradient as it is (for losses that normalise themselves)."""


class GradNormMetricsMode(StrEnum):
    """Which gradient-norm metrics `optim_step` reports."""

    OFF = "off"
    BASIC = "basic"
    DETAILED = "detailed"


@dataclass(frozen=True)
class SaveSamplerResult:
    """The outcome of `FiretitanTrainingClient.save_weights_for_sampler_ext`.

    `snapshot_name` is the name actually saved (the requested name plus the client's suffix);
    `path` is the identity the trainer reports, which is what a deployment hotloads. Locally the
    two are equal.
    """

    path: str
    snapshot_name: str


class LoadAdapterResponse(BaseModel):
    """The result of the Firetitan `load_adapter` operation."""

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    model_id: str
    adapter_path: str | None = None
    type: Literal["load_adapter"] = "load_adapter"
