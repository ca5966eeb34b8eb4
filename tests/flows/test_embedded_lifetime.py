"""The embedded platform lives as long as the runs that lease it, and no longer.

Runs here name no platform, so each starts the embedded one on `<run_dir>/platform` (tiny
model, two steps). A run gives its lease back when it is over, and the last lease stops the
platform: after sequential runs in one process no platform, server thread or port is left. A
flow retry keeps the lease (the retry finds the same platform at the same URL). Past
`FIRELOOP_MAX_EMBEDDED_PLATFORMS` a run fails at once, naming the variable, before any compute.

A `serve` process (Prefect 3.9.1's runner) executes each flow run in a spawned child process
of its own, so the platform dies with that child: the last test serves the SFT flow in a
subprocess, has it run two flow runs, and checks that no port the serve process listened on
meanwhile answered as a platform and that every child it started is gone. It waits on real
processes (each child imports torch and Prefect, about 10 s on 2 cores), hence its minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from flows.config import SFTConfig
from flows.embedded import (
    MAX_EMBEDDED_PLATFORMS_ENV,
    EmbeddedPlatformLimitError,
    acquire_embedded,
    embedded_lease,
    embedded_platform,
    live_embedded_platforms,
    release_embedded,
)
from flows.ledger import LEDGER_FILENAME
from flows.monitoring import Progress, progress_listener
from flows.sft import configured_sft_flow, run_sft
from tests.flows.conftest import sft_config
from tests.flows.support import read_run

pytestmark = pytest.mark.usefixtures("prefect_server")


def _config(run_dir: Path, **overrides: Any) -> SFTConfig:
    fields = {"max_steps": 2, "checkpoint_every": 2, "batch_size": 4} | overrides
    return sft_config(None, run_dir, **fields)


def _platform_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fireloop-platform" and t.is_alive()]


def _refused(base_url: str) -> bool:
    try:
        httpx.get(f"{base_url}/health", timeout=2.0)
    except httpx.ConnectError:
        return True
    return False


def test_sequential_runs_leave_no_platform_alive(tmp_path: Path) -> None:
    assert live_embedded_platforms() == {}
    for name in ("first", "second"):
        seen: set[str] = set()

        def on_progress(_: Progress, seen: set[str] = seen) -> None:
            seen.update(live_embedded_platforms().values())

        result = run_sft(_config(tmp_path / name), on_progress)
        assert result.steps_done == 2
        (base_url,) = seen  # one platform served the run while it trained
        assert live_embedded_platforms() == {}
        assert _platform_threads() == []
        assert _refused(base_url)


def test_a_flow_retry_reuses_the_platform_it_leased(tmp_path: Path) -> None:
    run_dir = tmp_path / "retried"
    config = _config(run_dir, max_steps=4, checkpoint_every=2, flow_retries=1)
    urls: dict[int, set[str]] = {}

    def on_progress(progress: Progress) -> None:
        urls.setdefault(flow_run.run_count, set()).update(live_embedded_platforms().values())
        platform = embedded_platform(run_dir / "platform")
        if progress.step == 0 and flow_run.run_count == 1 and platform is not None:
            platform.schedule_preemption([3])  # the trainer is lost after its third step

    with progress_listener(on_progress):
        state = configured_sft_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message
    assert read_run(state).run_count == 2
    assert sorted(urls) == [1, 2]
    assert len(urls[1]) == 1 and urls[1] == urls[2]  # the retry found the same platform
    assert live_embedded_platforms() == {}


def test_leases_of_one_owner_count_once_and_the_last_release_stops_the_platform(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "platform"
    first = acquire_embedded(data_dir, "run-a")
    assert acquire_embedded(data_dir, "run-a").base_url == first.base_url  # a retry
    assert acquire_embedded(data_dir, "run-b").base_url == first.base_url  # a sharer
    release_embedded("run-a")
    assert list(live_embedded_platforms().values()) == [first.base_url]
    release_embedded("run-b")
    assert live_embedded_platforms() == {}
    assert _refused(first.base_url)


def test_past_the_limit_a_run_fails_before_any_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_EMBEDDED_PLATFORMS_ENV, "1")
    run_dir = tmp_path / "one-too-many"
    with embedded_lease(tmp_path / "held" / "platform") as held:
        with pytest.raises(EmbeddedPlatformLimitError) as raised:
            run_sft(_config(run_dir))
        assert MAX_EMBEDDED_PLATFORMS_ENV in str(raised.value)
        assert "the limit is 1" in str(raised.value)
        assert not (run_dir / LEDGER_FILENAME).exists()
        assert list(live_embedded_platforms().values()) == [held.base_url]
    assert live_embedded_platforms() == {}


def test_a_limit_that_is_not_a_number_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_EMBEDDED_PLATFORMS_ENV, "four")
    with pytest.raises(ValueError, match=MAX_EMBEDDED_PLATFORMS_ENV):
        acquire_embedded(tmp_path / "platform", "run-a")
    assert live_embedded_platforms() == {}


# Each run's child imports the flow by its module path (a pickled flow object loses the
# config model its parameters are checked against).
SERVE = """
from prefect import serve
from prefect.types.entrypoint import EntrypointType
from flows.sft import sft_flow
deployment = sft_flow.to_deployment(name="lifetime", entrypoint_type=EntrypointType.MODULE_PATH)
serve(deployment, limit=1, pause_on_shutdown=False)
"""
SERVED_RUNS = 2
SERVE_TIMEOUT_S = 240


def _run_processes(pid: int) -> set[int]:
    """The live flow-run processes `pid` started (Linux /proc): `python -m prefect.engine`
    (or a multiprocessing spawn), not helpers such as multiprocessing's resource tracker."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # `pid (comm) state ppid ...`; comm may hold spaces, so split after its parenthesis.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) != pid or fields[0] == "Z":
            continue
        cmdline = (entry / "cmdline").read_bytes()
        if b"prefect.engine" in cmdline or b"spawn_main" in cmdline:
            found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports `pid` listens on (its socket inodes matched in /proc/<pid>/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _is_platform(port: int) -> bool:
    """Whether a local platform answers on `port` (its health route)."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
        return answer.status_code == 200 and answer.json() == {"status": "ok"}
    except (httpx.HTTPError, ValueError):
        return False


def _wait_for_deployment(server: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                return str(client.read_deployment_by_name("sft/lifetime").id)
            except Exception:  # not registered yet
                time.sleep(0.5)
    raise AssertionError("the serve process never registered its deployment")


@pytest.mark.slow
def test_a_serve_process_runs_each_flow_run_in_its_own_process(tmp_path: Path) -> None:
    env = os.environ | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    output = tmp_path / "serve-output.txt"
    with output.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVE], env=env, cwd=tmp_path, stdout=sink, stderr=sink
        )
    try:
        deployment_id = _wait_for_deployment(server)
        with get_client(sync_client=True) as client:
            run_ids = [
                client.create_flow_run_from_deployment(
                    deployment_id,  # type: ignore[arg-type]
                    parameters={
                        "config": _config(tmp_path / f"served-{n}").model_dump(mode="json")
                    },
                ).id
                for n in range(SERVED_RUNS)
            ]
            children: set[int] = set()
            deadline = time.monotonic() + SERVE_TIMEOUT_S
            states: list[Any] = []
            probed: set[int] = set()  # every port the serve process listened on meanwhile
            platform_ports: set[int] = set()
            while time.monotonic() < deadline and server.poll() is None:
                children |= _run_processes(server.pid)
                for port in _listening_ports(server.pid) - probed:
                    probed.add(port)
                    if _is_platform(port):
                        platform_ports.add(port)
                states = [client.read_flow_run(run_id).state for run_id in run_ids]
                if all(state is not None and state.is_final() for state in states):
                    break
                time.sleep(0.5)
        log = output.read_text(errors="replace")[-3000:]
        assert all(state is not None and state.is_completed() for state in states), log
        assert len(children) >= SERVED_RUNS, children  # one child per flow run (at least)
        for n in range(SERVED_RUNS):
            assert (tmp_path / f"served-{n}" / LEDGER_FILENAME).is_file()
            assert (tmp_path / f"served-{n}" / "platform").is_dir()  # an embedded platform's
        # A child reports its final state before it exits: give the last one time to go.
        deadline = time.monotonic() + 30
        while _run_processes(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _run_processes(server.pid) == set()
        # No platform ever served from the serve process; each run's served from its child.
        assert platform_ports == set(), platform_ports
        orphans = {pid for pid in children if _running(pid)}  # reparented, still running
        assert orphans == set()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
