"""`WeightSyncer`: save the policy's weights for serving and hotload them, delta-chained.

The chain rules: a session's first sync is a full `base` (the deployment may still hold another
run's snapshot); full-parameter runs then send `delta`s whose metadata names the last
*hotloaded* identity; LoRA adapters are always `base`, never with metadata (see
docs/platform-contract.md, 'Hotload'). After every hotload the syncer verifies that each
replica is ready and serves the new snapshot and raises `StaleDeploymentError` otherwise: an
evaluation must never read stale weights. The syncer alone decides base or delta: a failed
save or hotload resets its chain itself, so the next sync is a full load; after a re-attach call
`reset_delta_chain()`. `sync` returns a typed `SyncResult` (identity, kind, timings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

from sdk.deployment import DeploymentManager
from sdk.errors import ConfigError, DeploymentError, HotloadError
from sdk.firetitan_types import CHECKPOINT_TYPES, CheckpointType, SaveSamplerResult
from sdk.hotload_types import COMPRESSION_FORMAT, IncrementalSnapshotMetadata
from sdk.resources import last_segment
from sdk.sampling import DeploymentSampler
from sdk.sampling_types import Tokenizer

if TYPE_CHECKING:
    from sdk.firetitan_sampling import FiretitanSamplingClient

__all__ = ["SamplerSnapshotSource", "SyncResult", "SyncTiming", "WeightSyncer"]

logger = logging.getLogger(__name__)


class SamplerSnapshotSource(Protocol):
    """What the syncer needs of a training client (`FiretitanTrainingClient` has it)."""

    lora_rank: int

    def save_weights_for_sampler_ext(
        self, name: str, checkpoint_type: str | None = None, ttl_seconds: int | None = None
    ) -> SaveSamplerResult: ...


def _checkpoint_type(value: str) -> CheckpointType:
    for kind in CHECKPOINT_TYPES:
        if value.strip().lower() == kind:
            return kind
    raise ConfigError(
        f"checkpoint_type must be one of {', '.join(CHECKPOINT_TYPES)}, got {value!r}"
    )


def _zero_timing() -> dict[str, float]:
    return {"save_time_s": 0.0, "hotload_time_s": 0.0, "warmup_time_s": 0.0, "total_time_s": 0.0}


class SyncTiming(BaseModel):
    """Seconds spent in each phase of one sync (0 for a phase that did not run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    save_s: float = 0.0
    hotload_s: float = 0.0  # the load request until the deployment reports it done
    verify_s: float = 0.0  # until every replica serves the new identity
    warmup_s: float = 0.0
    total_s: float = 0.0


class SyncResult(BaseModel):
    """One `WeightSyncer.sync`: the snapshot saved, its kind, where it is served, how long.

    `deployment_id` is None when the syncer only saves (no deployment); otherwise every replica
    of that deployment was verified serving `identity` before this result existed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # the name asked for
    identity: str  # the snapshot identity the trainer returned (what a deployment loads)
    kind: CheckpointType
    deployment_id: str | None
    timing: SyncTiming

    @property
    def hotloaded(self) -> bool:
        """Whether the snapshot was hotloaded and verified (not only saved)."""
        return self.deployment_id is not None


@dataclass
class WeightSyncer:
    """Checkpoint-and-hotload for one training client and (optionally) one deployment.

    Hotload is enabled when both `deploy_mgr` and `deployment_id` are set. `trainer_job_name`
    (`accounts/<a>/rlorTrainerJobs/<j>`), when given, must be the trainer the deployment is
    attached to. The `*_interval_s`/`*_timeout_s` fields bound every wait (tests pass small ones).
    """

    policy_client: SamplerSnapshotSource
    deploy_mgr: DeploymentManager | None = None
    deployment_id: str | None = None
    base_model: str = ""
    hotload_timeout: float = 600
    first_checkpoint_type: CheckpointType = "base"
    compression_format: str = COMPRESSION_FORMAT
    warmup_after_hotload: bool = True
    warmup_max_retries: int = 10
    reset_prompt_cache: bool = True
    lora_rank: int = 0
    trainer_job_name: str | None = None
    hotload_poll_interval_s: float = 5.0
    hotload_ready_timeout_s: float = 300.0
    verify_timeout_s: float = 60.0
    verify_poll_interval_s: float = 1.0
    warmup_retry_interval_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    base_saved: bool = field(default=False, init=False)
    base_identity: str | None = field(default=None, init=False)
    last_timing: dict[str, float] = field(default_factory=_zero_timing, init=False)
    # The last successful sync of this chain; None before the first and after a reset.
    last_synced: SyncResult | None = field(default=None, init=False)
    _deployment_checked: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.first_checkpoint_type = _checkpoint_type(self.first_checkpoint_type)
        client_rank = int(getattr(self.policy_client, "lora_rank", 0) or 0)
        if self.lora_rank and client_rank and self.lora_rank != client_rank:
            raise ConfigError(
                f"lora_rank: the syncer says {self.lora_rank}, the training client "
                f"{client_rank}; delta metadata on an adapter would crash the deployment"
            )
        # The client knows whether it trains an adapter; the syncer's field may be left at 0.
        self.lora_rank = self.lora_rank or client_rank
        if self.hotload_enabled and not self.base_model:
            raise ConfigError("base_model: required to hotload (the deployment checks it)")

    @property
    def hotload_enabled(self) -> bool:
        """Whether saves are also hotloaded (a deployment manager and id are both set)."""
        return self.deploy_mgr is not None and self.deployment_id is not None

    # -- saving and hotloading -------------------------------------------------------------

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str:
        """Save a sampler snapshot and, if enabled, hotload and verify it; the snapshot name.

        The same as `sync(name, checkpoint_type).identity`; see `sync` for the errors.
        """
        return self.sync(name, checkpoint_type).identity

    def sync(self, name: str, checkpoint_type: str | None = None) -> SyncResult:
        """Save a sampler snapshot and, if enabled, hotload and verify it; what was done.

        The kind is the syncer's own decision unless `checkpoint_type` forces one: `base` for
        the chain's first sync (`first_checkpoint_type`) and for every LoRA adapter, `delta`
        after that. Raises on any failure, after resetting the chain (the next sync is a full
        load): `HotloadError` (refused, failed or timed out), `StaleDeploymentError` (a replica
        still serves something else), `DeploymentError` (wrong deployment for this trainer or
        base model), or the training client's own error for a failed save.
        """
        started = self.clock()
        kind = self._next_checkpoint_type(checkpoint_type)
        try:
            snapshot = self._save(name, kind)
            save_s = self.clock() - started
            phases = self._do_hotload(snapshot, kind) if self.hotload_enabled else (0.0,) * 3
        except BaseException:
            # Whatever the trainer or the deployment now holds, a full load is always valid.
            self.reset_delta_chain()
            raise
        hotload_s, verify_s, warmup_s = phases
        timing = SyncTiming(
            save_s=save_s,
            hotload_s=hotload_s,
            verify_s=verify_s,
            warmup_s=warmup_s,
            total_s=self.clock() - started,
        )
        self.last_timing = {
            "save_time_s": timing.save_s,
            "hotload_time_s": timing.hotload_s + timing.verify_s,
            "warmup_time_s": timing.warmup_s,
            "total_time_s": timing.total_s,
        }
        self.last_synced = SyncResult(
            name=name,
            identity=snapshot,
            kind=kind,
            deployment_id=self.deployment_id if self.hotload_enabled else None,
            timing=timing,
        )
        return self.last_synced

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save a sampler snapshot without hotloading it; None (logged) on any failure.

        A `delta` saved here and never hotloaded breaks the chain of the next hotload: a
        delta applies only on top of the snapshot hotloaded last.
        """
        try:
            return self._save(name, self._next_checkpoint_type(checkpoint_type))
        except Exception:  # the contract: report, never raise
            logger.exception("saving sampler snapshot %r failed", name)
            return None

    def hotload(self, snapshot_name: str, checkpoint_type: str) -> bool:
        """Hotload and verify an already saved snapshot; False (logged) on any failure, after
        which the next sync is a full load."""
        try:
            self._do_hotload(snapshot_name, _checkpoint_type(checkpoint_type))
        except Exception:  # the contract: report, never raise
            logger.exception("hotloading %r failed", snapshot_name)
            self.reset_delta_chain()
            return False
        return True

    def reset_delta_chain(self) -> None:
        """Make the next save a full `base` load (after a failed hotload, re-attach or resume),
        and re-check the deployment before it; `last_synced` is cleared (nothing is vouched for)."""
        self.base_saved = False
        self.base_identity = None
        self.last_synced = None
        self._deployment_checked = False

    # -- deployment state ------------------------------------------------------------------

    def check_deployment_state(self) -> str | None:
        """The snapshot identity replica 0 serves, or None (no replica or no snapshot)."""
        manager, deployment_id = self._target()
        status = manager.hotload_check_status(deployment_id, self.base_model)
        if not status.replicas:
            return None
        return status.replicas[0].current_snapshot_identity or None

    def wait_for_hotload_ready(self, timeout_s: float = 300, poll_interval_s: float = 5) -> None:
        """Wait until the deployment's hotload status lists replicas; `WaitTimeoutError`.

        A hotload sent before the status lists replicas can crash a serving container.
        """
        manager, deployment_id = self._target()
        manager.wait_for_hotload_ready(
            deployment_id, self.base_model, timeout_s=timeout_s, poll_interval_s=poll_interval_s
        )

    def get_deployment_sampler(self, tokenizer: Tokenizer | str | None = None) -> DeploymentSampler:
        """A sampler for the deployment (`accounts/<a>/deployments/<d>` at its inference URL)."""
        manager, deployment_id = self._target()
        return manager.create_sampler(deployment_id, tokenizer=tokenizer)

    def get_sampling_client(
        self, tokenizer: Tokenizer | str | None = None
    ) -> FiretitanSamplingClient:
        """`get_deployment_sampler` behind tinker's sampling-client interface."""
        from sdk.firetitan_sampling import FiretitanSamplingClient  # imports tinker

        return FiretitanSamplingClient(self.get_deployment_sampler(tokenizer))

    # -- internals ---------------------------------------------------------------------------

    def _target(self) -> tuple[DeploymentManager, str]:
        if self.deploy_mgr is None or self.deployment_id is None:
            raise ConfigError("deploy_mgr and deployment_id: both are needed to reach a deployment")
        return self.deploy_mgr, self.deployment_id

    def _next_checkpoint_type(self, explicit: str | None) -> CheckpointType:
        """Explicit, else: LoRA → `base`; the chain's first save → `first_checkpoint_type`;
        then `delta`."""
        if explicit is not None:
            return _checkpoint_type(explicit)
        if self.lora_rank > 0:
            return "base"
        return "delta" if self.base_saved else self.first_checkpoint_type

    def _save(self, name: str, kind: CheckpointType) -> str:
        result = self.policy_client.save_weights_for_sampler_ext(name, checkpoint_type=kind)
        self.base_saved = True
        logger.info("saved sampler snapshot %s (%s)", result.snapshot_name, kind)
        return result.snapshot_name

    def _do_hotload(self, snapshot: str, kind: CheckpointType) -> tuple[float, float, float]:
        """Load, verify and warm up `snapshot`; the seconds of each of those three phases."""
        manager, deployment_id = self._target()
        if not self._deployment_checked:
            self._check_deployment(manager, deployment_id)
            self._deployment_checked = True
        metadata = None
        if kind == "delta" and self.lora_rank == 0 and self.base_identity is not None:
            metadata = IncrementalSnapshotMetadata(
                previous_snapshot_identity=self.base_identity,
                compression_format=self.compression_format,
            )
        started = self.clock()
        loaded = manager.hotload_and_wait(
            deployment_id,
            self.base_model,
            snapshot,
            metadata,
            self.reset_prompt_cache,
            timeout_seconds=self.hotload_timeout,
            poll_interval=self.hotload_poll_interval_s,
        )
        if not loaded:
            raise HotloadError(
                f"hotload of {snapshot} onto {deployment_id} failed: "
                f"{manager.last_hotload_error_message or 'no reason given'}",
                deployment_id=deployment_id,
                snapshot_identity=snapshot,
            )
        hotload_s = self.clock() - started
        started = self.clock()
        manager.verify_hotload(
            deployment_id,
            self.base_model,
            snapshot,
            timeout_s=self.verify_timeout_s,
            poll_interval_s=self.verify_poll_interval_s,
        )
        self.base_identity = snapshot  # the chain follows what was *hotloaded* and verified
        verify_s = self.clock() - started
        logger.info("deployment %s serves %s (%s) on every replica", deployment_id, snapshot, kind)
        warmup_s = 0.0
        if self.warmup_after_hotload:
            started = self.clock()
            manager.warmup(
                f"accounts/{manager.account_id}/deployments/{deployment_id}",
                max_retries=self.warmup_max_retries,
                retry_interval_s=self.warmup_retry_interval_s,
            )
            warmup_s = self.clock() - started
        return hotload_s, verify_s, warmup_s

    def _check_deployment(self, manager: DeploymentManager, deployment_id: str) -> None:
        """Once per chain: the deployment is this trainer's and base model's, and its hotload
        subsystem is up (a hotload sent earlier can crash it). A snapshot it already holds, perhaps
        another run's, is not a base for our deltas."""
        info = manager.get(deployment_id)
        if info is None:
            raise DeploymentError(
                f"deployment {deployment_id} does not exist",
                deployment_id=deployment_id,
                state=None,
            )
        if info.base_model and last_segment(info.base_model) != last_segment(self.base_model):
            raise DeploymentError(
                f"deployment {deployment_id} serves base model {info.base_model!r}, but the "
                f"policy is {self.base_model!r}: a snapshot only loads onto its own base model",
                deployment_id=deployment_id,
                state=info.state,
            )
        attached = info.hot_load_trainer_job
        if self.trainer_job_name and attached and attached != self.trainer_job_name:
            raise DeploymentError(
                f"deployment {deployment_id} is attached to trainer {attached}, not "
                f"{self.trainer_job_name}: it cannot load this trainer's snapshots; "
                "re-attach it (DeploymentManager.reattach_trainer) or use another deployment",
                deployment_id=deployment_id,
                state=info.state,
            )
        self.wait_for_hotload_ready(self.hotload_ready_timeout_s, self.hotload_poll_interval_s)
        if self.check_deployment_state() is not None:
            self.base_identity = None  # someone else's snapshot: the first load is full
