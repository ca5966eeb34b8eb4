"""`fireloop backend` as a user starts it: a real subprocess, a relative data directory, the key
from the environment or a file, SDK calls and a `fireloop run sft` against it, then SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sdk import DeploymentConfig, DeploymentManager, TrainerJobConfig, TrainerJobManager

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
KEY = f"fw-local-test-{uuid.uuid4().hex}"
BACKEND = [sys.executable, "-m", "fireloop.cli", "backend"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Backend:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    cwd: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM, as a supervisor or `kill` sends it; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"fireloop backend ignored SIGTERM:\n{self.log()}") from None


def start_backend(cwd: Path, args: list[str], env: dict[str, str]) -> Backend:
    """`fireloop backend --port <free> ARGS` in `cwd`, waited for through `GET /health`."""
    port = _free_port()
    log_path = cwd / f"backend-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*BACKEND, "--port", str(port), *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    backend = Backend(process, f"http://127.0.0.1:{port}", log_path, cwd)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{backend.base_url}/health", timeout=1.0).status_code == 200:
                return backend
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    backend.stop()
    raise AssertionError(f"fireloop backend did not start:\n{backend.log()}")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FIREWORKS_API_KEY"}
    return env | extra


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The README's way: a relative data directory, the key in FIREWORKS_API_KEY."""
    cwd = tmp_path_factory.mktemp("standalone")
    running = start_backend(cwd, ["--data-dir", "rel/dir"], _env(FIREWORKS_API_KEY=KEY))
    try:
        yield running
    finally:
        running.stop()


def test_startup_log_names_the_data_dir_url_and_routes_but_not_the_key(backend: Backend) -> None:
    log = backend.log()
    assert str((backend.cwd / "rel" / "dir").resolve()) in log
    assert backend.base_url in log
    for prefix in (
        "/v1/accounts/local/",
        "/training/v1/rlorTrainerJobs/",
        "/hot_load/v1/",
        "/inference/v1/",
        "/health",
    ):
        assert prefix in log, log
    assert "API key: from FIREWORKS_API_KEY" in log  # where it came from, never the key
    assert KEY not in log


def test_health_needs_no_key_and_everything_else_does(backend: Backend) -> None:
    health = httpx.get(f"{backend.base_url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert httpx.get(f"{backend.base_url}/v1/accounts").status_code == 401
    assert httpx.post(f"{backend.base_url}/health").status_code in (401, 405)
    authorized = httpx.get(f"{backend.base_url}/v1/accounts", headers={"X-Api-Key": KEY})
    assert authorized.status_code == 200


def test_trainer_and_deployment_become_ready_with_a_relative_data_dir(backend: Backend) -> None:
    job_id, deployment_id = f"job-{uuid.uuid4().hex[:8]}", f"serve-{uuid.uuid4().hex[:8]}"
    with (
        TrainerJobManager(api_key=KEY, base_url=backend.base_url) as trainers,
        DeploymentManager(api_key=KEY, base_url=backend.base_url) as deployments,
    ):
        trainers.create_and_wait(
            TrainerJobConfig(base_model="fireloop/tiny", requested_job_id=job_id),
            timeout_s=60,
            poll_interval_s=0.1,
        )
        config = DeploymentConfig(
            deployment_id=deployment_id, base_model="fireloop/tiny", hot_load_trainer_job=job_id
        )
        deployments.create_or_get(config)
        ready = deployments.wait_for_ready(deployment_id, timeout_s=60, poll_interval_s=0.1)
    assert ready.state == "READY"
    # The model came from the shared cache: the run's data directory holds no copy.
    assert not (backend.cwd / "rel" / "dir" / "models").exists()


def test_run_sft_with_a_relative_data_dir_backend_finishes(backend: Backend) -> None:
    run_dir = backend.cwd / "runs" / "sft-standalone"
    command = [sys.executable, "-m", "fireloop.cli", "run", "sft"]
    for assignment in (
        f"platform.base_url={backend.base_url}",
        "max_steps=2",
        "sample_eval=false",
        "eval_every=0",
        f"run_dir={run_dir}",
    ):
        command += ["--set", assignment]
    result = subprocess.run(
        command,
        cwd=backend.cwd,
        env=_env(FIREWORKS_API_KEY=KEY),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_key_file_is_read_and_sigterm_stops_the_server(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    running = start_backend(tmp_path, ["--data-dir", "d", "--api-key-file", str(key_file)], _env())
    try:
        headers = {"X-Api-Key": KEY}
        assert httpx.get(f"{running.base_url}/v1/accounts", headers=headers).status_code == 200
        # The file's key, not one generated into the data directory.
        assert not (tmp_path / "d" / "api-key").exists()
    finally:
        code = running.stop()
    assert code in (0, -signal.SIGTERM), running.log()
    assert f"API key: from {key_file}" in running.log()
    assert KEY not in running.log()
    assert "visible to other local users" not in running.log()


def test_key_on_the_command_line_works_with_a_warning(tmp_path: Path) -> None:
    running = start_backend(tmp_path, ["--data-dir", "d", "--api-key", KEY], _env())
    try:
        headers = {"X-Api-Key": KEY}
        assert httpx.get(f"{running.base_url}/v1/accounts", headers=headers).status_code == 200
    finally:
        running.stop()
    log = running.log()
    assert "visible to other local users in the process list" in log
    assert KEY not in log
