"""The local platform: its state, its one FastAPI app, and the ways to run it.

`PlatformState` holds everything the routes serve (store, services, faults, hooks); `create_app`
wires it into one app on one port; `LocalPlatform` runs that app in a background thread of the
current process (tests, embedded flows) and `serve` in the foreground (`fireloop backend`).
Directories are made absolute once, at construction: the data directory (jobs, checkpoints,
snapshots) and the shared read-only model cache (`backend.models.cache`). A restart is a new
platform on the same data directory and key: jobs, deployments and checkpoint rows persist, jobs
that were RUNNING become FAILED (their trainer died with the process), and the leftovers of saves
that crashed are cleaned up. `GET /health` is the one route that needs no key.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from backend.auth import HEALTH_PATH, ApiKeyMiddleware
from backend.control import Clock, account_guard
from backend.control.accounts import accounts_router
from backend.control.checkpoints import (
    Checkpoint,
    CheckpointService,
    CheckpointType,
    checkpoints_router,
)
from backend.control.deployments import DeploymentService, deployments_router
from backend.control.jobs import JobRecord, JobState, TrainerJob, TrainerJobService, jobs_router
from backend.control.models import ModelCatalog, models_router
from backend.control.promotion import PromotionService, promotion_router
from backend.control.shapes import TrainingShapeCatalog, shapes_router
from backend.errors import install_error_handlers
from backend.faults import FaultInjector, FaultMiddleware, FaultStats
from backend.gateway import GATEWAY_PREFIX, TrainerGateway, gateway_router
from backend.models.cache import resolve_models_dir
from backend.serving import HotloadService, ServingRuntime, serving_router
from backend.serving.routes import HOTLOAD_PATH
from backend.store import Store
from backend.trainer.atomic import recover_directories
from backend.trainer.routes import trainer_router
from backend.trainer.service import TrainerRegistry

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_KEY_FILE = "api-key"


class PlatformTimings(BaseModel):
    """How long the simulated transitions take (tests pass tiny values)."""

    model_config = ConfigDict(frozen=True)

    job_pending_s: float = Field(default=0.2, ge=0)
    job_creating_s: float = Field(default=0.3, ge=0)
    deployment_creating_s: float = Field(default=0.3, ge=0)
    deployment_updating_s: float = Field(default=0.2, ge=0)


class PlatformState:
    """Everything one running platform knows; shared by its routes and by in-process callers."""

    def __init__(
        self,
        *,
        data_dir: Path,
        api_key: SecretStr,
        account_id: str,
        timings: PlatformTimings,
        clock: Clock = time.time,
        models_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.models_dir = resolve_models_dir(models_dir)
        # Saves that crashed between their steps left temporary or set-aside directories.
        recover_directories(self.data_dir / "jobs")
        self.api_key = api_key
        self.account_id = account_id
        self.timings = timings
        self.clock = clock
        self.store = Store(self.data_dir / "platform.sqlite3")
        self.shapes = TrainingShapeCatalog(account_id)
        self.jobs = TrainerJobService(
            self.store,
            clock,
            self.shapes,
            pending_s=timings.job_pending_s,
            creating_s=timings.job_creating_s,
        )
        self.checkpoints = CheckpointService(self.store, clock, self.jobs)
        self.promotions = PromotionService(
            account_id=account_id,
            data_dir=self.data_dir,
            models_dir=self.models_dir,
            store=self.store,
            jobs=self.jobs,
            clock=clock,
        )
        self.models = ModelCatalog(account_id, self.promotions)
        self.deployments = DeploymentService(
            self.store,
            clock,
            self.jobs,
            self.data_dir / "hotload",
            creating_s=timings.deployment_creating_s,
            updating_s=timings.deployment_updating_s,
        )
        self.faults = FaultInjector(self.jobs.fail_running)
        self.gateway = TrainerGateway(self.jobs, account_guard(account_id))
        # What the previous process left RUNNING lost its trainer with it.
        self.jobs.fail_after_restart()
        # The trainers behind the gateway: one per RUNNING job, created on its first request.
        self.trainers = TrainerRegistry(self)
        # The deployments' serving replicas (they also gate CREATING → READY) and hotload.
        self.serving = ServingRuntime(self.models_dir, self.deployments, clock)
        self.hotload = HotloadService(self.serving, self.data_dir)

    # Hooks and calls for the trainer and the serving side.
    def on_job_lost(self, callback: Callable[[str], None]) -> None:
        """`callback(job_id)` runs when a job leaves RUNNING (preempted, cancelled, deleted)."""
        self.jobs.on_job_lost(callback)

    def on_deployment_reset(self, callback: Callable[[str], None]) -> None:
        """`callback(deployment_id)` runs when a deployment must unload its weights."""
        self.deployments.on_deployment_reset(callback)

    def touch(self, job_id: str) -> None:
        """Record trainer activity on the job (resets its inactivity timer)."""
        self.jobs.touch(job_id)

    def record_checkpoint(
        self, job_id: str, name: str, checkpoint_type: CheckpointType
    ) -> Checkpoint:
        """Publish a completed checkpoint of the job as a row of its checkpoint list."""
        return self.checkpoints.record_checkpoint(job_id, name, checkpoint_type)

    def record_optim_step(self, job_id: str, count: int) -> bool:
        """The trainer's optimizer step count; True when a scheduled preemption fired."""
        return self.faults.record_optim_step(job_id, count)

    def get_job(self, job_id: str) -> TrainerJob | None:
        """The job as the API returns it (states advanced to now), or None."""
        record = self.jobs.find(job_id)
        return None if record is None else self.jobs.to_wire(record)

    def job_record(self, job_id: str) -> JobRecord | None:
        """The stored job (spec, state, times), states advanced to now; None when absent."""
        return self.jobs.find(job_id)

    def job_state(self, job_id: str) -> JobState | None:
        record = self.jobs.find(job_id)
        return None if record is None else record.state

    def close(self) -> None:
        self.serving.close()
        self.trainers.close()
        self.store.close()


def create_app(state: PlatformState, *gateway_routers: APIRouter) -> FastAPI:
    """The platform's one app: control plane and trainer gateway, behind auth and faults.

    `gateway_routers` are trainer routes mounted under the gateway prefix (see `gateway`).
    """
    # No interactive docs: every route needs the API key, which a browser cannot send.
    app = FastAPI(title="fireloop local platform", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.platform = state
    app.state.trainer_gateway = state.gateway
    install_error_handlers(app)
    app.include_router(health_router())
    check_account = account_guard(state.account_id)
    app.include_router(accounts_router(state.account_id))
    app.include_router(jobs_router(state.jobs, check_account))
    app.include_router(checkpoints_router(state.checkpoints, check_account))
    app.include_router(promotion_router(state.promotions, check_account))
    app.include_router(models_router(state.models, check_account))
    app.include_router(shapes_router(state.shapes, check_account))
    app.include_router(deployments_router(state.deployments, check_account))
    trainer = trainer_router(state.gateway, state.trainers)
    app.include_router(gateway_router(trainer, *gateway_routers))
    app.include_router(serving_router(state.serving, state.hotload, check_account))
    # The last middleware added runs first: authentication, then fault injection, so only
    # authenticated requests draw from the fault sequence.
    app.add_middleware(FaultMiddleware, injector=state.faults)
    app.add_middleware(ApiKeyMiddleware, api_key=state.api_key)
    return app


def health_router() -> APIRouter:
    """`GET /health`: 200 while the server answers; the one route served without the key."""
    router = APIRouter()

    @router.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return router


def route_prefixes(account_id: str) -> dict[str, str]:
    """What the app serves, by part, as the startup log prints it."""
    return {
        "control plane": f"/v1/accounts/{account_id}/...",
        "trainer gateway": f"{GATEWAY_PREFIX}/...",
        "hotload": HOTLOAD_PATH,
        "inference": "/inference/v1/completions",
        "health (no key)": HEALTH_PATH,
    }


def generate_api_key() -> str:
    # Never `tml-…`: that prefix switches the SDK's service client to plain tinker auth.
    return f"fw-local-{secrets.token_hex(16)}"


def _check_loopback(host: str) -> None:
    # The platform trusts whoever holds the key and runs no TLS: it must stay on this machine.
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"host {host!r} is not a loopback address; use 127.0.0.1")


def _offline_environment() -> None:
    # Models come from the data directory, never from a hub (offline): fail fast, not hang.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class LocalPlatform:
    """The local platform on a free loopback port of this process, as a context manager."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        api_key: str | None = None,
        account_id: str = "local",
        host: str = "127.0.0.1",
        port: int = 0,
        timings: PlatformTimings | None = None,
        *,
        clock: Clock = time.time,
        models_dir: str | Path | None = None,
    ) -> None:
        """`data_dir` None: a temporary directory, removed on `stop`. `models_dir` None:
        `$FIRELOOP_MODEL_CACHE`, else `~/.cache/fireloop/models`. Both become absolute here,
        so a later change of the working directory cannot move them."""
        _check_loopback(host)
        if api_key is not None and api_key.startswith("tml-"):
            raise ValueError("api_key must not start with 'tml-' (the SDK treats it as tinker's)")
        self._requested_data_dir = None if data_dir is None else _absolute(data_dir)
        self._models_dir = resolve_models_dir(models_dir)
        self._api_key = SecretStr(api_key or generate_api_key())
        self._account_id = account_id
        self._host = host
        self._port = port
        self._timings = timings or PlatformTimings()
        self._clock = clock
        self._temp_dir: Path | None = None
        self._state: PlatformState | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:  # never shows the key
        return f"LocalPlatform(base_url={self.base_url!r}, account_id={self._account_id!r})"

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def api_key(self) -> str:
        return self._api_key.get_secret_value()

    @property
    def account_id(self) -> str:
        return self._account_id

    @property
    def data_dir(self) -> Path:
        if self._requested_data_dir is not None:
            return self._requested_data_dir
        if self._temp_dir is None:
            raise RuntimeError("the platform has no data directory until it is started")
        return self._temp_dir

    @property
    def models_dir(self) -> Path:
        """The shared, read-only cache of built base models."""
        return self._models_dir

    @property
    def state(self) -> PlatformState:
        if self._state is None:
            raise RuntimeError("the platform is not started")
        return self._state

    @property
    def fault_stats(self) -> FaultStats:
        return self.state.faults.stats

    def preempt(self, job_id: str) -> None:
        """Fail a RUNNING job now ("preempted"); ValueError if it is not RUNNING."""
        self.state.faults.preempt(job_id)

    def schedule_preemption(self, at_optim_steps: list[int]) -> None:
        """Preempt the job reaching each of these optimizer step counts, once per value."""
        self.state.faults.schedule_preemption(at_optim_steps)

    def inject_faults(self, rate: float, seed: int) -> None:
        """Fail `rate` of the following requests (503 or a dropped response), seeded."""
        self.state.faults.inject_faults(rate, seed)

    def clear_faults(self) -> None:
        self.state.faults.clear_faults()

    def start(self) -> None:
        """Open the data directory, bind the port and serve until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the platform is already started")
        _offline_environment()
        if self._requested_data_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="fireloop-platform-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._state = PlatformState(
            data_dir=self.data_dir,
            api_key=self._api_key,
            account_id=self._account_id,
            timings=self._timings,
            clock=self._clock,
            models_dir=self._models_dir,
        )
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # proto=IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only
        # when the socket says so; without it every keep-alive response waits ~40 ms for the
        # client's delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # A restart on the same port must not fail on connections still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._port = sock.getsockname()[1]
        self._server = uvicorn.Server(_server_config(create_app(self._state)))
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="fireloop-platform", daemon=True
        )
        self._thread.start()
        self._wait_started()
        logger.info("local platform serving on %s (data in %s)", self.base_url, self.data_dir)

    def stop(self) -> None:
        """Stop serving, close the store and remove a temporary data directory."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(_STOP_TIMEOUT_S)
            if self._thread.is_alive():
                logger.warning("local platform did not stop in %.0f s; forcing", _STOP_TIMEOUT_S)
                self._server.force_exit = True
                self._thread.join(_STOP_TIMEOUT_S)
        if self._state is not None:
            self._state.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._server = self._thread = self._state = self._temp_dir = None

    def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # reported by `_wait_started`; SystemExit included
            self._thread_error = exc

    def _wait_started(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                cause = self._thread_error
                self.stop()
                raise RuntimeError(f"the local platform failed to start: {cause!r}") from cause
            time.sleep(0.01)


def _server_config(
    app: FastAPI, *, foreground: bool = False, host: str = "127.0.0.1", port: int = 0
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info" if foreground else "warning",
        # In process, leave the host application's logging configuration alone.
        log_config=uvicorn.config.LOGGING_CONFIG if foreground else None,
        access_log=False,
        lifespan="off",
        # Long requests must not hold up shutdown for ever.
        timeout_graceful_shutdown=3,
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | Path | None = None,
    api_key: str | None = None,
    account_id: str = "local",
    models_dir: str | Path | None = None,
    api_key_source: str = "given by the caller",
    preempt_at_steps: Sequence[int] = (),
) -> None:
    """Run the platform in the foreground until interrupted (`fireloop backend`).

    Without `api_key`, the key is read from (or created in) `<data_dir>/api-key` (mode 0600),
    so a restarted server keeps its key; it is never logged, only where it came from
    (`api_key_source`). The startup log names the data directory, the model cache, the URL and
    the route prefixes served.
    """
    _check_loopback(host)
    _offline_environment()
    root = _absolute(data_dir or Path(".fireloop") / "backend")
    root.mkdir(parents=True, exist_ok=True)
    key_source = api_key_source if api_key else f"kept in {root / _KEY_FILE}"
    key = SecretStr(api_key or _stored_api_key(root / _KEY_FILE))
    state = PlatformState(
        data_dir=root,
        api_key=key,
        account_id=account_id,
        timings=PlatformTimings(),
        models_dir=resolve_models_dir(models_dir),
    )
    if preempt_at_steps:
        # A fault drill: a job reaching one of these optimizer step counts is preempted.
        state.faults.schedule_preemption(preempt_at_steps)
        logger.warning(
            "fault drill: preempting jobs at optimizer steps %s", sorted(preempt_at_steps)
        )
    config = _server_config(create_app(state), foreground=True, host=host, port=port)
    logger.info("local platform data directory: %s", state.data_dir)
    logger.info("base model cache (read-only to the platform): %s", state.models_dir)
    logger.info("API key: %s", key_source)
    logger.info("serving on http://%s:%d", host, port)
    for part, prefix in route_prefixes(account_id).items():
        logger.info("  %-16s %s", part, prefix)
    try:
        uvicorn.Server(config).run()
    finally:
        state.close()


def _absolute(directory: str | Path) -> Path:
    # Resolved once: a relative path would otherwise change meaning with the working directory
    # (and cannot be written as the file:// URL deployments report).
    return Path(directory).expanduser().resolve()


def _stored_api_key(path: Path) -> str:
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    key = generate_api_key()
    path.touch(mode=0o600)
    path.write_text(key, encoding="utf-8")
    return key
