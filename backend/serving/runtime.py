"""Serving replicas: one per deployment with replicas, holding the weights it serves.

A `Replica` is what a serving pod is on the real platform: it starts by loading the base model
(until then the hotload status lists no replica, so clients wait before a hotload), then
serves completions on its own generation thread and swaps weights when a hotload completes. It
reports `readiness` and a new `current_snapshot_identity` only after the swapped weights serve
(so a client never reads a new identity from old weights), and every swap and every start takes
the next value of a per-deployment weight version that never goes back.

`ServingRuntime` owns the replicas: it starts one eagerly when a deployment is created or
re-attached (the control plane asks `replica_up_since` before it reports READY), stops it when
the deployment is scaled to zero, re-attached or deleted (`on_deployment_reset`), and starts it
again on demand. torch is imported on the start thread, never at platform start.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from backend.control import Clock
from backend.control.deployments import DeploymentService
from backend.serving.engine import ServingEngineSettings, resolve_serving_engine

if TYPE_CHECKING:
    from backend.serving.generation import DecodingModel
    from backend.serving.loop import GenerationLoop, Submission
    from backend.serving.weights import ModelFactory

logger = logging.getLogger(__name__)

Stage = Literal["idle", "downloading", "loading", "completed", "error"]
# A replica that failed to start is retried on demand, but not more often than this.
_RESTART_BACKOFF_S = 5.0


class ServingSettings(BaseModel):
    """How replicas serve and load; tests pass small or observable values."""

    model_config = ConfigDict(frozen=True)

    # Sequences decoded together at most; more wait in the replica's queue.
    max_batch_size: int = Field(default=64, ge=1)
    # Extra time a hotload spends `downloading`, so tests can observe a load in progress.
    load_delay_s: float = Field(default=0.0, ge=0)
    # Extra time a replica takes to come up (a slow pod), so tests can observe it starting.
    start_delay_s: float = Field(default=0.0, ge=0)
    # How long the status says `completed` after a load before it says `idle`.
    completed_hold_s: float = Field(default=2.0, ge=0)
    # How long a request to a replica that is not up (scaled to zero, restarted platform)
    # waits for the base weights before it is answered 503.
    scale_up_timeout_s: float = Field(default=60.0, gt=0)
    # How long a hotload waits for requests admitted before it to finish (the swap drains).
    drain_timeout_s: float = Field(default=600.0, gt=0)
    # `auto`: CUDA when available, else CPU.
    device: str = "auto"
    # The decoding engine (KV cache layout); default from $FIRELOOP_SERVING_ENGINE, else auto.
    engine: ServingEngineSettings = Field(default_factory=ServingEngineSettings.from_env)


@dataclass
class LoadingState:
    """The `loading_state` of the hotload status."""

    stage: Stage = "idle"
    target: str = ""
    message: str = ""
    since: float = field(default_factory=time.monotonic)


class ServedWeights(NamedTuple):
    """The weights a completion is generated with: the deployment's weight version and the
    hotloaded snapshot's identity ("" for the base weights, as the hotload status says)."""

    version: int
    snapshot_identity: str


class ReplicaBusyError(Exception):
    """A hotload is in progress on the replica (completions answer 425, hotloads 409)."""


class ReplicaStoppedError(Exception):
    """The replica was stopped (scaled to zero, re-attached, deleted, platform stopping)."""


class Replica:
    """One serving replica of a deployment: its weights, identity, version and load state."""

    def __init__(self, deployment_id: str, base_model: str, name: str, created_at: float) -> None:
        self.deployment_id = deployment_id
        self.base_model = base_model
        self.name = name  # the pod's name: a new one on every (re)start
        self.created_at = created_at  # platform clock
        self.lock = threading.Lock()
        self._standby_lock = threading.Lock()  # one standby build at a time
        self._up = threading.Event()  # base weights loaded
        # Up, failed to start, or stopped: whatever a waiter for the start needs to know.
        self._settled = threading.Event()
        self.up_since: float | None = None  # platform clock
        self.start_error: str | None = None
        self.failed_at = 0.0  # monotonic
        self.stopped = False
        self.factory: ModelFactory | None = None
        self.loop: GenerationLoop | None = None
        self.model: DecodingModel | None = None
        # A second model of the same architecture that no request uses: every load is written
        # into it, and the swap makes the replaced one the next standby.
        self.standby: DecodingModel | None = None
        self.identity = ""
        self.adapters: tuple[str, ...] = ()
        self.version = 0
        self.loading = LoadingState()
        self.load_active = False  # a hotload accepted and not yet finished
        # Notified whenever a load ends (served, failed, or the replica stopped), for status
        # requests held until then.
        self._load_ended = threading.Condition(self.lock)

    @property
    def serving(self) -> bool:
        """Up with weights to serve (possibly loading others)."""
        return self._up.is_set() and not self.stopped

    @property
    def ready(self) -> bool:
        """Serving, and not in the middle of a load."""
        return self.serving and not self.load_active

    def wait_started(self, timeout_s: float) -> bool:
        """Block until the start settles (up, failed or stopped); True when serving."""
        self._settled.wait(timeout_s)
        return self.serving

    def mark_up(self) -> None:
        self._up.set()
        self._settled.set()

    def mark_stopped(self) -> None:
        self.stopped = True
        self._settled.set()

    def submit(self, submission: Submission) -> ServedWeights:
        """Queue a completion on the served weights; their version and snapshot identity.
        `ReplicaBusyError` during a load (checked under the lock the load takes, so no request
        slips in after it). A swap waits for every request queued before it, and the identity
        changes only after the swap, so what this returns names the weights of every token."""
        with self.lock:
            if self.load_active:
                raise ReplicaBusyError(self.loading.target)
            if self.loop is None:
                raise ReplicaStoppedError(self.name)
            self.loop.submit(submission)
            return ServedWeights(self.version, self.identity)

    def begin_load(self, identity: str) -> bool:
        """Mark a hotload of `identity` accepted; False when it is already loading (a resent
        POST). `ReplicaBusyError` while another identity loads."""
        with self.lock:
            if self.load_active:
                if self.loading.target == identity:
                    return False
                raise ReplicaBusyError(self.loading.target)
            self.load_active = True
            self.loading = LoadingState("downloading", identity)
            return True

    def standby_model(self) -> DecodingModel:
        """The model to write the next load into: the standby, else a new base model (built
        once). `ReplicaStoppedError` once the replica is stopped."""
        with self._standby_lock:
            with self.lock:
                standby, factory = self.standby, self.factory
            if standby is not None:
                return standby
            if factory is None:
                raise ReplicaStoppedError(self.name)
            standby = factory.base()
            with self.lock:
                if self.stopped:
                    raise ReplicaStoppedError(self.name)
                self.standby = standby
            return standby

    def drop_standby(self) -> None:
        """Forget the standby (a failed load left it unfit for others): the next load that
        needs one builds a new base model."""
        with self._standby_lock, self.lock:
            self.standby = None

    def set_stage(self, stage: Stage) -> None:
        with self.lock:
            self.loading = LoadingState(stage, self.loading.target)

    def finish_load(
        self, model: DecodingModel, identity: str, adapters: tuple[str, ...], version: int
    ) -> bool:
        """The swap is done: only now do identity, version and readiness change.
        False when the replica was stopped meanwhile (nothing changes)."""
        with self.lock:
            if self.stopped:
                return False
            # The loop swapped on an empty batch: no request uses the replaced model any more.
            self.standby, self.model = self.model, model
            self.identity, self.adapters = identity, adapters
            self.version = version
            self.loading = LoadingState("completed", identity)
            self.load_active = False
            self._load_ended.notify_all()
            return True

    def fail_load(self, identity: str, message: str) -> None:
        """The load failed; the previous weights keep serving."""
        with self.lock:
            self.loading = LoadingState("error", identity, message)
            self.load_active = False
            self._load_ended.notify_all()

    def wait_load_of(self, identity: str, timeout_s: float) -> None:
        """Block while a load of `identity` is in progress, at most `timeout_s`: returns at
        once when none is (done already, another identity's, or never asked)."""
        with self.lock:
            self._load_ended.wait_for(
                lambda: self.stopped or not (self.load_active and self.loading.target == identity),
                timeout_s,
            )

    def stage(self, completed_hold_s: float) -> LoadingState:
        """The loading state as reported: `completed` turns `idle` after the hold time."""
        with self.lock:
            state = self.loading
        if state.stage == "completed" and time.monotonic() - state.since >= completed_hold_s:
            return LoadingState("idle", state.target, since=state.since)
        return state

    def stop(self, reason: str) -> None:
        """Unload: fail what is queued or decoding and drop the weights."""
        with self.lock:  # under the lock: a start finishing now sees it and stops its loop
            self.stopped = True
            loop, self.loop, self.model, self.standby = self.loop, None, None, None
            self._load_ended.notify_all()
        self.mark_stopped()
        if loop is not None:
            loop.stop(reason)


class ServingRuntime:
    """Every replica of the platform, started, stopped and versioned per deployment."""

    def __init__(
        self,
        models_dir: Path,
        deployments: DeploymentService,
        clock: Clock,
        settings: ServingSettings | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.deployments = deployments
        self.clock = clock
        # Read when a replica starts or a request arrives: tests may replace it on a running
        # platform (as they do the trainers' settings).
        self.settings = settings or ServingSettings()
        self._replicas: dict[str, Replica] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        deployments.on_deployment_reset(self.reset)
        deployments.attach_replicas(self)

    # -- the control plane's view ---------------------------------------------------------------

    def replica_up_since(
        self, deployment_id: str, base_model: str, not_before: float
    ) -> float | None:
        """`ReplicaGate`: when the deployment's replica, started at or after `not_before`,
        finished loading its base weights (platform clock); None while it is not up, in which
        case it is being started. An older replica is the pod a reset is replacing (its hook
        runs just after the state change commits): it does not count. Never blocks."""
        current = self.replica(deployment_id)
        if current is not None and current.created_at < not_before:
            return None
        replica = self.ensure_replica(deployment_id, base_model)
        return replica.up_since if replica.serving else None

    def reset(self, deployment_id: str) -> None:
        """`on_deployment_reset`: the pod goes away; a deployment that still has replicas (a
        re-attach) gets a new one at once, one scaled to zero when a request comes."""
        with self._lock:
            replica = self._replicas.pop(deployment_id, None)
        if replica is not None:
            replica.stop("the deployment was scaled to zero, re-attached or deleted")
            logger.info("deployment %s: replica %s stopped", deployment_id, replica.name)
        record = self.deployments.find(deployment_id)
        if record is not None and record.spec.max_replica_count > 0:
            self.ensure_replica(deployment_id, record.spec.base_model)

    # -- replicas -------------------------------------------------------------------------------

    def replica(self, deployment_id: str) -> Replica | None:
        with self._lock:
            return self._replicas.get(deployment_id)

    def ensure_replica(self, deployment_id: str, base_model: str) -> Replica:
        """The deployment's replica, starting one (in the background) when there is none."""
        with self._lock:
            replica = self._replicas.get(deployment_id)
            if (
                replica is not None
                and replica.start_error is not None
                and time.monotonic() - replica.failed_at >= _RESTART_BACKOFF_S
            ):
                replica = None
            if replica is not None:
                return replica
            # The pod's name, as the real platform reports one per replica: new on every start.
            name = f"{deployment_id}-{secrets.token_hex(4)}"
            replica = Replica(deployment_id, base_model, name, self.clock())
            if self._closed:
                replica.mark_stopped()
                return replica
            self._replicas[deployment_id] = replica
        threading.Thread(
            target=self._start, args=(replica,), name=f"replica-start-{name}", daemon=True
        ).start()
        return replica

    def next_version(self, deployment_id: str) -> int:
        """The next weight version of the deployment (monotonic over replicas and swaps)."""
        with self._lock:
            return self._bump_version(deployment_id)

    def _failed_to_start(self, replica: Replica, reason: str) -> None:
        """Keep the failed replica (its error answers requests) until a retry replaces it."""
        replica.start_error, replica.failed_at = reason, time.monotonic()
        replica.mark_stopped()

    def close(self) -> None:
        """Stop every replica (the platform is stopping)."""
        with self._lock:
            self._closed = True
            replicas, self._replicas = list(self._replicas.values()), {}
        for replica in replicas:
            replica.stop("the local platform is stopping")

    def _bump_version(self, deployment_id: str) -> int:
        version = self._versions.get(deployment_id, 0) + 1
        self._versions[deployment_id] = version
        return version

    def _start(self, replica: Replica) -> None:
        started = time.monotonic()
        time.sleep(self.settings.start_delay_s)
        try:
            factory, model, loop = _load_base(self.models_dir, replica, self.settings)
        except Exception as exc:
            logger.exception("deployment %s: replica failed to start", replica.deployment_id)
            self._failed_to_start(replica, f"loading {replica.base_model!r} failed: {exc}")
            return
        with replica.lock:
            if replica.stopped:  # reset while loading: this pod never comes up
                loop.stop("the replica was stopped while starting")
                return
            replica.factory, replica.model, replica.loop = factory, model, loop
            replica.version = self.next_version(replica.deployment_id)
            replica.up_since = self.clock()
        replica.mark_up()
        logger.info(
            "deployment %s: replica %s up with %s in %.2f s",
            replica.deployment_id,
            replica.name,
            replica.base_model,
            time.monotonic() - started,
        )
        self._prebuild_standby(replica)

    def _prebuild_standby(self, replica: Replica) -> None:
        """Build the standby of a replica that will hotload (its deployment is linked to a
        trainer) now, in the background, rather than during its first hotload."""
        record = self.deployments.find(replica.deployment_id)
        if record is None or not record.spec.hot_load_trainer_job:
            return
        try:
            replica.standby_model()
        except ReplicaStoppedError:
            return
        except Exception:  # reported; the first hotload builds it again
            logger.exception("deployment %s: building the standby failed", replica.deployment_id)


def _load_base(
    models_dir: Path, replica: Replica, settings: ServingSettings
) -> tuple[ModelFactory, DecodingModel, GenerationLoop]:
    # Imported here: torch, transformers and peft take seconds, and only a replica needs them.
    import torch

    from backend.models.store import ensure_model_dir, model_context_length
    from backend.serving.loop import GenerationLoop
    from backend.serving.weights import ModelFactory

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = ensure_model_dir(replica.base_model, models_dir)
    context_length = model_context_length(replica.base_model, models_dir)
    plan = resolve_serving_engine(settings.engine, torch.device(device).type, context_length)
    factory = ModelFactory(model_dir, torch.device(device), context_length)
    model = factory.base()
    loop = GenerationLoop(f"serve-{replica.name}", model, settings.max_batch_size, plan)
    return factory, model, loop
