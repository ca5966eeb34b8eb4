"""The published tinker 0.38 client, unmodified, against `fireloop backend` started as a user would.

The client lives in its own virtualenv (the project pins tinker 0.23), built from the package
registry on first use and cached under `$FIRELOOP_COMPAT_VENVS` (default
`${XDG_CACHE_HOME:-~/.cache}/fireloop/compat-venvs`); the test skips, saying why, only when the
registry cannot be reached. The client script (`tinker038_client.py`) trains a LoRA and a
full-parameter model, saves, reloads, creates a client from the saved state, samples and closes
its session.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

TINKER_VERSION = "0.38.0"
CLIENT_SCRIPT = Path(__file__).with_name("tinker038_client.py")
# The stock client refuses keys that do not start with `tml-` before sending anything.
KEY = f"tml-fireloop-{uuid.uuid4().hex}"
START_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 240.0
# pip's words when the registry cannot be reached (as opposed to a broken install).
_UNREACHABLE = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Max retries exceeded",
    "Network is unreachable",
    "No matching distribution found",
)

pytestmark = pytest.mark.slow


def _venv_root() -> Path:
    configured = os.environ.get("FIRELOOP_COMPAT_VENVS")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fireloop" / "compat-venvs"


def _client_python() -> Path:
    """The python of a cached virtualenv with tinker==0.38.0, built once (atomically)."""
    venv = _venv_root() / f"tinker-{TINKER_VERSION}"
    python = venv / "bin" / "python"
    if (venv / "READY").is_file():
        return python
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    install = subprocess.run(
        [
            str(building / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            f"tinker=={TINKER_VERSION}",
        ],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        output = install.stdout + install.stderr
        if any(sign in output for sign in _UNREACHABLE):
            pytest.skip(f"package registry unreachable, tinker=={TINKER_VERSION} not installed")
        raise AssertionError(f"pip install tinker=={TINKER_VERSION} failed:\n{output}")
    (building / "READY").write_text(TINKER_VERSION)
    # A virtualenv's scripts hold its absolute path: build where it will live, then swap in.
    shutil.rmtree(venv, ignore_errors=True)
    try:
        building.rename(venv)
    except OSError:  # another run finished first: use that one
        shutil.rmtree(building, ignore_errors=True)
    return python


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def backend_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`fireloop backend` with a `tml-` key from the environment; its base URL."""
    cwd = tmp_path_factory.mktemp("tinker038")
    port = _free_port()
    env = os.environ | {"FIREWORKS_API_KEY": KEY}
    log_path = cwd / "backend.log"
    fireloop = [sys.executable, "-m", "fireloop.cli", "backend", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*fireloop, "--data-dir", "data"], cwd=cwd, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "fireloop backend did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(15)


def test_stock_tinker_038_trains_saves_loads_and_samples(backend_url: str) -> None:
    python = _client_python()
    env = os.environ | {"TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [str(python), str(CLIENT_SCRIPT), backend_url, KEY],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    assert report["tinker"] == TINKER_VERSION
    for kind in ("lora", "full"):
        seen = report[kind]
        assert seen["losses"][-1] < seen["losses"][0]
        assert seen["state_path"].startswith("tinker://") and seen["state_path"].endswith(
            "/weights/state-1"
        )
        assert len(seen["sample_tokens"]) == 2 and all(len(t) == 4 for t in seen["sample_tokens"])
        assert len(set(seen["sequence_ids"])) == 2
        assert seen["sampler_path"].endswith("/sampler_weights/sampler-1")
        assert seen["tokenizer"] == [97, 98, 99, 61]  # found offline through get_info's path
    assert KEY not in run.stdout + run.stderr
