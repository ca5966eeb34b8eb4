"""The wire shapes of the hotload API, parsed tolerantly.

Responses ignore unknown fields (a newer server never breaks us); the delta metadata of a
request forbids them, because the server's schema does too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

__all__ = [
    "CHECKSUM_FORMAT",
    "COMPRESSION_FORMAT",
    "STAGE_ERROR",
    "DeltaMetadata",
    "HotloadAck",
    "HotloadStatus",
    "IncrementalSnapshotMetadata",
    "LoadedAdapter",
    "LoadingState",
    "ReplicaStatus",
]

# Both literals are the platform's, typo included: "alder32", not "adler32".
COMPRESSION_FORMAT = "arc_v2"
CHECKSUM_FORMAT = "alder32"
STAGE_ERROR = "error"


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class IncrementalSnapshotMetadata(BaseModel):
    """What makes a hotload a delta: the snapshot it applies to, and how it is encoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    previous_snapshot_identity: str
    compression_format: str = COMPRESSION_FORMAT
    checksum_format: str = CHECKSUM_FORMAT


# What `hotload` takes as delta metadata: the model, or the plain dict the reference SDK sends.
DeltaMetadata = IncrementalSnapshotMetadata | Mapping[str, Any]


class LoadingState(_Wire):
    """Where a replica is in loading `target_snapshot_identity` (stage `error` with a message)."""

    stage: str = "idle"
    target_snapshot_identity: str | None = None
    error_message: str | None = Field(
        default=None, validation_alias=AliasChoices("error_message", "error", "message")
    )


class LoadedAdapter(_Wire):
    """A LoRA adapter a replica holds."""

    identity: str | None = None
    status: str | None = None


class ReplicaStatus(_Wire):
    """One replica's hotload status: the snapshot it serves, whether it is ready, its load stage.

    `identity` is the replica's own name where the server reports one (a pod name, new on every
    restart); the served snapshot is `current_snapshot_identity` ("" or None: base weights).
    """

    current_snapshot_identity: str | None = None
    identity: str | None = None
    readiness: bool = False
    loading_state: LoadingState = LoadingState()
    loaded_adapters: list[LoadedAdapter] = []

    @property
    def restart_marker(self) -> str | None:
        """What changes when the replica restarts (see `reattach_trainer`): the served snapshot,
        or, when none is served, the replica's own identity."""
        return self.current_snapshot_identity or self.identity

    def serves(self, identity: str) -> bool:
        """Ready, and serving `identity` as its weights or as a loaded adapter."""
        if not self.readiness:
            return False
        if self.current_snapshot_identity == identity:
            return True
        return any(a.identity == identity and a.status == "loaded" for a in self.loaded_adapters)

    def failed_on(self, identity: str) -> bool:
        """Whether loading *this* identity failed (an old error for another target is stale)."""
        state = self.loading_state
        return state.stage == STAGE_ERROR and state.target_snapshot_identity == identity


class HotloadStatus(_Wire):
    """The hotload status answer. `replicas` is None when the server omitted the list (a schema
    error for `wait`) and empty while the hot-load subsystem is not up yet (do not load then)."""

    replicas: list[ReplicaStatus] | None = None


class HotloadAck(_Wire):
    """The answer to a load request: the server took it; loading continues asynchronously."""

    identity: str | None = None
    accepted: bool | None = None
