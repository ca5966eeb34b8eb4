"""The temporary Prefect server a CLI run owns, out of the way of the terminal's signals.

Prefect's own temporary server is a subprocess in the CLI's process group, so a Ctrl-C reaches
it first: the flow can no longer report its end (it stays Running for ever) and every log
write fails for minutes; a SIGTERM to the CLI leaves it running, orphaned. This one runs in a
session of its own, so only the CLI sees the signal, and is stopped on every way out.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

__all__ = ["PrefectApi", "PrefectServerError", "TemporaryPrefectServer", "prefect_api"]

API_URL_ENV: Final = "PREFECT_API_URL"
STARTUP_TIMEOUT_S: Final = 120.0  # a cold start migrates its SQLite database; 2 shared CPUs
STOP_GRACE_S: Final = 5.0
DRAIN_TIMEOUT_S: Final = 3.0


class PrefectServerError(RuntimeError):
    """The temporary Prefect server did not come up; the message says what it printed."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be sent SIGTERM if the CLI dies without stopping
    it (SIGKILL, an out-of-memory kill), so no server outlives the run."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block; they are delivered when it ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _prefect_parent() -> str:
    """The directory holding the `prefect` package, found without importing it (its settings
    are read at import, and PREFECT_API_URL must be in place before that)."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise PrefectServerError("the prefect package is not installed")
    return str(Path(spec.origin).parent.parent)


@dataclass
class TemporaryPrefectServer:
    """A Prefect API server (uvicorn) on a free loopback port, in its own session."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path | None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def launch(cls, log_path: Path | None = None) -> TemporaryPrefectServer:
        """Start the server process and return at once (`wait_ready` waits for it), so its
        start overlaps the CLI's own imports and config checks."""
        port = _free_port()
        command = [
            sys.executable,
            *("-m", "uvicorn", "--app-dir", _prefect_parent(), "--factory"),
            "prefect.server.api.server:create_app",
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "error", "--lifespan", "on"),
        ]
        # The same environment Prefect gives its own temporary server (no UI, ephemeral).
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop(API_URL_ENV, None)
        log = log_path.open("wb") if log_path is not None else None
        try:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log or subprocess.DEVNULL,
                stderr=log or subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C goes to the CLI alone
                preexec_fn=_die_with_parent,
            )
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        return cls(process=process, port=port, log_path=log_path)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until the health route answers; stop the server if it never does."""
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise PrefectServerError(
                        f"the temporary Prefect server exited with code "
                        f"{self.process.returncode}{self._log_hint()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                time.sleep(0.1)
        raise PrefectServerError(
            f"the temporary Prefect server did not answer within {timeout_s:.0f} s"
            f"{self._log_hint()}"
        )

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:].strip()
        return f"; it printed:\n{tail}" if tail else ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after a grace period; idempotent. A second
        Ctrl-C meanwhile waits until the server is gone, so it cannot strand it."""
        if self.process.poll() is not None:
            return
        with _signals_deferred():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _drain_prefect_workers(timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Send Prefect's queued log lines and events while the server still answers.

    Prefect drains them at interpreter exit, without a deadline, and would wait for ever on a
    server that is already gone.
    """
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: the run's outcome is already known
            worker.drain_all(timeout=timeout_s)


@dataclass(frozen=True)
class PrefectApi:
    """Where this process's flows report: a configured server, or a temporary one."""

    url: str
    server: TemporaryPrefectServer | None

    def wait_ready(self) -> None:
        if self.server is not None:
            self.server.wait_ready()


@contextmanager
def prefect_api() -> Iterator[PrefectApi]:
    """The Prefect API for this process: PREFECT_API_URL when set, else a temporary server
    launched here (call `wait_ready` before the first flow) and stopped on the way out, however
    the block is left.

    Enter it before `prefect` is imported: Prefect reads its settings once, at import.
    """
    configured = os.environ.get(API_URL_ENV)
    if configured:
        yield PrefectApi(url=configured, server=None)
        return
    handle, name = tempfile.mkstemp(prefix="fireloop-prefect-server-", suffix=".log")
    os.close(handle)
    log_path = Path(name)
    try:
        server = TemporaryPrefectServer.launch(log_path=log_path)
        os.environ[API_URL_ENV] = server.api_url
        try:
            yield PrefectApi(url=server.api_url, server=server)
        finally:
            _drain_prefect_workers()
            server.stop()
            if os.environ.get(API_URL_ENV) == server.api_url:
                del os.environ[API_URL_ENV]
    finally:
        log_path.unlink(missing_ok=True)
