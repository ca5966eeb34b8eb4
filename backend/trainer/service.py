"""The trainer behind the gateway: one `JobTrainer` per RUNNING job, created on first use.

A `JobTrainer` is what a trainer pod holds in memory: tinker sessions, their models
(`{session}:train:{n}`), the futures of submitted operations, one sequencer per model and one
worker thread that runs every operation of the job in order. When the control plane reports the
job lost (preempted, cancelled, deleted), the trainer fails what is pending and drops
everything; only checkpoints and snapshots on disk survive, as on the real platform.

Routes call the methods here on request threads with typed commands (the routes decoded them):
they validate, register and enqueue, and never compute; the operations themselves
(`operations.py`, which imports torch) run on the worker.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.control.jobs import JobRecord
from backend.models.registry import canonical_model_name, resolve_model
from backend.trainer.checkpoints import CheckpointStore
from backend.trainer.errors import ServerError, UserError
from backend.trainer.futures import FutureRecord, FutureStore
from backend.trainer.job import JobContext, ModelEntry, TrainerHost, check_lora_capacity
from backend.trainer.samplers import SamplerInfo, SamplerSessions
from backend.trainer.sequencer import ModelSequencer, Operation
from backend.trainer.settings import EngineSettings
from backend.trainer.wire import (
    CreateModelRequest,
    CreateSamplingSessionRequest,
    GetInfoResponse,
    ModelData,
    OrderedCommand,
    SampleRequest,
    SampleResult,
    UnloadModelResult,
    WeightsInfoResponse,
    WireResult,
)
from backend.trainer.worker import JobWorker

if TYPE_CHECKING:
    from types import ModuleType

    from backend.trainer.sampling import SamplerCache

logger = logging.getLogger(__name__)

OrderedKind = Literal[
    "forward",
    "forward_backward",
    "optim_step",
    "save_weights",
    "load_weights",
    "save_weights_for_sampler",
    "load_adapter",
]
# The `X-Tinker-Request-Type` each ordered operation's future is polled with.
_REQUEST_TYPES: dict[OrderedKind, str] = {
    "forward": "Forward",
    "forward_backward": "ForwardBackward",
    "optim_step": "OptimStep",
    "save_weights": "SaveWeights",
    "load_weights": "LoadWeights",
    "save_weights_for_sampler": "SaveWeightsForSampler",
    "load_adapter": "LoadAdapter",
}
_JOIN_TIMEOUT_S = 5.0


class TrainerSettings(BaseModel):
    """Timing and placement of the trainers; tests pass small values."""

    model_config = ConfigDict(frozen=True)

    # How long `retrieve_future` holds a request for a result (below tinker's 45 s timeout).
    retrieve_hold_s: float = Field(default=25.0, gt=0)
    # How long an operation waits behind a missing seq id before failing.
    gap_timeout_s: float = Field(default=900.0, gt=0)
    # How long finished results stay retrievable.
    future_ttl_s: float = Field(default=3600.0, gt=0)
    # Models one trainer holds loaded at once (each LoRA client or reference keeps its own
    # copy of the base weights and its own optimizer state, so memory grows with every one).
    max_models: int = Field(default=8, gt=0)
    # `auto`: CUDA when available, else CPU.
    device: str = "auto"
    # The compute path of every model these trainers load (`auto`: per device).
    engine: EngineSettings = EngineSettings()


def _operations() -> ModuleType:
    # Imported on first use: it pulls in torch, transformers and peft (seconds), which the
    # control plane and the platform's start-up never need.
    from backend.trainer import operations

    return operations


class JobTrainer:
    """The in-memory trainer of one RUNNING job (one incarnation of it)."""

    def __init__(
        self, job: JobRecord, host: TrainerHost, settings: TrainerSettings, store: CheckpointStore
    ) -> None:
        config = job.spec.training_config
        self.job_id = job.job_id
        self.incarnation = job.state_since  # a resumed job is a new trainer
        self.base_model_name = config.base_model
        self.context = JobContext(
            job_id=job.job_id,
            base_model=canonical_model_name(config.base_model),
            lora_rank=config.lora_rank,
            # The control plane fills max_context_length at creation; older records may lack it.
            context_length=config.max_context_length
            or resolve_model(config.base_model).context_length,
            device=settings.device,
            engine=settings.engine,
            host=host,
            checkpoints=store,
            model_owner=self._model_owner,
            register_sampler=self._register_sampler,
        )
        self._settings = settings
        self.futures = FutureStore(ttl_s=settings.future_ttl_s)
        self._worker = JobWorker(f"trainer-{job.job_id}", tick=self._expire_gaps)
        self._lock = threading.Lock()
        self._sessions: set[str] = set()
        self._models: dict[str, ModelEntry] = {}
        self._create_requests: dict[str, str] = {}  # model id → its create_model request id
        self.samplers = SamplerSessions(self.context, config.base_model)
        self._sampler_cache: SamplerCache | None = None  # touched on the worker thread only

    # -- sessions ----------------------------------------------------------------------------

    def create_session(self) -> str:
        """A new session; older sessions' models are unloaded (one base model per trainer)."""
        session_id = f"s-{uuid.uuid4().hex[:8]}"
        with self._lock:
            for entry in self._models.values():
                if entry.unloaded_because is None:
                    entry.unload(f"a newer session ({session_id}) took over this trainer")
            self._sessions.add(session_id)
        logger.info("job %s: session %s created", self.job_id, session_id)
        return session_id

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    # -- models ------------------------------------------------------------------------------

    def create_model(self, request: CreateModelRequest) -> tuple[str, str]:
        """Register the model and queue its loading; (request id, model id). Idempotent.

        KeyError: unknown session. UserError (answered 400, nothing registered): a LoRA rank
        the job cannot hold, or a trainer already holding `max_models` models.
        """
        if not self.has_session(request.session_id):
            raise KeyError(f"unknown session {request.session_id!r}")
        model_id = f"{request.session_id}:train:{request.model_seq_id}"
        with self._lock:
            known = self._create_requests.get(model_id)
            if known is not None:  # a resubmitted create_model: same future, nothing new
                return known, model_id
            rank = 0 if request.lora_config is None else request.lora_config.rank
            if not request.base_only:
                check_lora_capacity(rank, self.context.lora_rank)
            self._check_model_capacity_locked()
            entry = ModelEntry(
                model_id=model_id,
                session_id=request.session_id,
                requested_base_model=request.base_model,
                base_only=request.base_only,
                lora_rank=0 if request.base_only else rank,
                sequencer=ModelSequencer(
                    model_id,
                    self.futures,
                    self._worker.dispatch,
                    gap_timeout_s=self._settings.gap_timeout_s,
                ),
            )
            record = self.futures.new("CreateModel")
            self._models[model_id] = entry
            self._create_requests[model_id] = record.request_id
        ops, ctx = _operations(), self.context
        self._worker.dispatch(lambda: ops.load_model(ctx, entry, request), record)
        return record.request_id, model_id

    def unload_model(self, model_id: str) -> str:
        """Queue the unloading (after the model's queued work); the request id."""
        entry = self._entry(model_id)
        record = self.futures.new("UnloadModel")

        def _unload() -> UnloadModelResult:
            entry.unload("unload_model was called")
            return UnloadModelResult(model_id=model_id)

        self._worker.dispatch(_unload, record)
        return record.request_id

    def get_info(self, model_id: str) -> GetInfoResponse:
        entry = self._entry(model_id)
        from backend.models.store import tokenizer_dir  # imports transformers

        tokenizer = tokenizer_dir(self.context.base_model, self.context.host.models_dir)
        return GetInfoResponse(
            model_id=model_id,
            model_data=ModelData(
                model_name=entry.requested_base_model, tokenizer_id=str(tokenizer)
            ),
            is_lora=entry.lora_rank > 0,
            lora_rank=entry.lora_rank,
            model_name=entry.requested_base_model,
        )

    # -- ordered operations ------------------------------------------------------------------

    def submit(
        self, kind: OrderedKind, model_id: str, seq_id: int | None, command: OrderedCommand
    ) -> str:
        """Accept an ordered operation of `model_id`; its request id (the same on resubmission).

        Problems are reported through the future (`category: "user"`), never by refusing the
        request, so the operation still consumes its seq id.
        """
        ops, ctx = _operations(), self.context
        # forward and forward_backward share one operation; the command's type tells them apart.
        run = ops.forward if kind in ("forward", "forward_backward") else getattr(ops, kind)

        def operation_of(entry: ModelEntry) -> Operation:
            return lambda: run(ctx, entry, command)

        return self._accept(kind, model_id, seq_id, operation_of)

    def refuse(self, kind: OrderedKind, model_id: str, seq_id: int | None, error: UserError) -> str:
        """An ordered request whose body did not decode into its command; its request id.

        It is accepted like any operation (in its seq id's turn, or after what is queued now for
        an unordered client) and its future fails with `error`, so the seq id is consumed.
        """

        def operation_of(entry: ModelEntry) -> Operation:
            def refused() -> WireResult:
                raise error

            return refused

        return self._accept(kind, model_id, seq_id, operation_of)

    def _accept(
        self,
        kind: OrderedKind,
        model_id: str,
        seq_id: int | None,
        operation_of: Callable[[ModelEntry], Operation],
    ) -> str:
        request_type = _REQUEST_TYPES[kind]
        with self._lock:
            entry = self._models.get(model_id)
        if entry is None:
            return self._failed(
                request_type, UserError(f"unknown model_id {model_id!r}")
            ).request_id
        operation = operation_of(entry)
        if seq_id is None:  # an unordered client: run after what is queued now
            record = self.futures.new(request_type)
            self._worker.dispatch(operation, record)
            return record.request_id
        try:
            return entry.sequencer.submit(seq_id, request_type, operation)
        except UserError as exc:  # a stale or invalid seq id
            return self._failed(request_type, exc).request_id

    def reject(
        self, kind: OrderedKind, model_id: str, seq_id: int | None, error: UserError
    ) -> str | None:
        """An ordered request whose body was refused at the edge; its request id, or None.

        With a seq id the refusal consumes that slot (the client's future for it fails with
        `error`, later operations go on at once); without one there is nothing to consume and
        the caller answers a plain 400.
        """
        if seq_id is None:
            return None
        request_type = _REQUEST_TYPES[kind]
        with self._lock:
            entry = self._models.get(model_id)
        if entry is None:
            return self._failed(
                request_type, UserError(f"unknown model_id {model_id!r}")
            ).request_id
        try:
            return entry.sequencer.reject(seq_id, request_type, error)
        except UserError as exc:  # a stale or invalid seq id
            return self._failed(request_type, exc).request_id

    # -- sampling (stock tinker clients) -------------------------------------------------------

    def create_sampling_session(self, request: CreateSamplingSessionRequest) -> str:
        """A sampling session of `request.session_id`; KeyError (session), UserError (source)."""
        if not self.has_session(request.session_id):
            raise KeyError(f"unknown session {request.session_id!r}")
        return self.samplers.create(
            request.session_id,
            request.sampling_session_seq_id,
            request.base_model,
            request.model_path,
        )

    def sample(self, request: SampleRequest | UserError) -> str:
        """Queue an `asample`; its request id. Sampling is not ordered (no seq id).

        A body that did not decode (`UserError`) is queued too, and its future fails with it.
        """
        record = self.futures.new("Sample")
        ops, ctx = _operations(), self.context

        def _sample() -> SampleResult:
            if isinstance(request, UserError):
                raise request
            info = self._sampler_source(request)
            if self._sampler_cache is None:
                self._sampler_cache = ops.new_sampler_cache(ctx)
            result: SampleResult = ops.sample(ctx, self._sampler_cache, info, request)
            return result

        self._worker.dispatch(_sample, record)
        return record.request_id

    def _register_sampler(self, session_id: str, seq_id: int, model_path: str) -> str:
        return self.samplers.create(session_id, seq_id, None, model_path)

    def _sampler_source(self, request: SampleRequest) -> SamplerInfo:
        session = request.sampling_session_id
        if session:
            try:
                return self.samplers.get(session)
            except KeyError:
                raise UserError(f"unknown sampling_session_id {session!r}") from None
        return self.samplers.resolve("ad-hoc", request.base_model, request.model_path)

    # -- synchronous reads -------------------------------------------------------------------

    def list_checkpoints(self) -> list[str]:
        return self.context.checkpoints.list_states(self.job_id)

    def weights_info(self, tinker_path: str) -> WeightsInfoResponse:
        """Base model and LoRA shape of a checkpoint; UserError (bad ref), KeyError (absent)."""
        ref = self.context.checkpoints.resolve(
            tinker_path, job_id=self.job_id, model_owner=self._model_owner
        )
        if ref.kind != "state":
            raise UserError(f"{tinker_path!r} is a sampler snapshot, not a training state")
        if not (ref.path / "state.json").is_file():
            raise KeyError(f"no checkpoint at {tinker_path!r}")
        return WeightsInfoResponse.model_validate(_operations().state_info(ref.path))

    # -- lifecycle ---------------------------------------------------------------------------

    def shutdown(self, reason: str) -> None:
        """Fail everything pending, stop the worker and drop all models (the pod is gone)."""
        error = ServerError(f"trainer of job {self.job_id!r} is gone: {reason}")
        self._worker.stop(error)
        failed = self.futures.fail_pending(error)
        with self._lock:
            for entry in self._models.values():
                entry.unload(reason)
            self._models.clear()
        logger.info(
            "job %s: trainer shut down (%s); %d operation(s) failed", self.job_id, reason, failed
        )

    def join(self, timeout_s: float = _JOIN_TIMEOUT_S) -> bool:
        return self._worker.join(timeout_s)

    # -- internals ---------------------------------------------------------------------------

    def _entry(self, model_id: str) -> ModelEntry:
        with self._lock:
            entry = self._models.get(model_id)
        if entry is None:
            raise KeyError(f"unknown model_id {model_id!r}")
        return entry

    def _check_model_capacity_locked(self) -> None:
        live = [m for m in self._models.values() if m.unloaded_because is None and not m.failure]
        limit = self._settings.max_models
        if len(live) >= limit:
            raise UserError(
                f"trainer job {self.job_id!r} already holds {len(live)} models, the most one "
                f"trainer keeps loaded ({limit}); unload_model one of them first"
            )

    def _model_owner(self, model_id: str) -> str | None:
        with self._lock:
            return self.job_id if model_id in self._models else None

    def _failed(self, request_type: str, error: BaseException) -> FutureRecord:
        record = self.futures.new(request_type)
        record.future.set_exception(error)
        return record

    def _expire_gaps(self) -> None:
        with self._lock:
            sequencers = [entry.sequencer for entry in self._models.values()]
        for sequencer in sequencers:
            sequencer.expire_gaps()


class TrainerRegistry:
    """Job id → its `JobTrainer`, created lazily for RUNNING jobs and dropped when lost."""

    def __init__(self, host: TrainerHost, settings: TrainerSettings | None = None) -> None:
        self._host = host
        # Read when a trainer is created (and per request for the retrieve hold): tests may
        # replace it on a running platform.
        self.settings = settings or TrainerSettings()
        self._store = CheckpointStore(host.data_dir, models_dir=host.models_dir)
        self._trainers: dict[str, JobTrainer] = {}
        self._lock = threading.Lock()
        host.on_job_lost(self.job_lost)

    def trainer(self, job: JobRecord) -> JobTrainer:
        """The trainer of a RUNNING job, created on first use (and anew after a resume)."""
        stale: JobTrainer | None = None
        with self._lock:
            current = self._trainers.get(job.job_id)
            if current is not None and current.incarnation == job.state_since:
                return current
            stale = current
            trainer = JobTrainer(job, self._host, self.settings, self._store)
            self._trainers[job.job_id] = trainer
        if stale is not None:  # left over from before the job was lost and resumed
            stale.shutdown("the job was restarted")
        logger.info("job %s: trainer started", job.job_id)
        return trainer

    def job_lost(self, job_id: str) -> None:
        """`on_job_lost` hook: the job left RUNNING, so its trainer state is gone."""
        with self._lock:
            trainer = self._trainers.pop(job_id, None)
        if trainer is not None:
            trainer.shutdown("the job left RUNNING (preempted, cancelled or deleted)")

    def close(self) -> None:
        """Shut every trainer down (the platform is stopping) and wait for their workers."""
        with self._lock:
            trainers = list(self._trainers.values())
            self._trainers.clear()
        for trainer in trainers:
            trainer.shutdown("the local platform is stopping")
        for trainer in trainers:
            if not trainer.join():
                logger.warning("job %s: trainer worker still busy at shutdown", trainer.job_id)
