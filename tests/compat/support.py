"""What every compatibility test shares: cached client virtualenvs and `fireloop backend` in a
subprocess.

Published clients run in their own virtualenvs (the project pins tinker 0.23 and does not ship
the Fireworks SDK), built from the package registry on first use and cached under
`$FIRELOOP_COMPAT_VENVS` (default `${XDG_CACHE_HOME:-~/.cache}/fireloop/compat-venvs`). A test
skips, saying why, only when the registry cannot be reached; a real install failure fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

START_TIMEOUT_S = 30.0
INSTALL_TIMEOUT_S = 900.0
# pip's words when the registry cannot be reached (as opposed to a broken install). "No
# matching distribution found" alone is not one of them: a misspelled pin says it too.
_UNREACHABLE = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Max retries exceeded",
    "Network is unreachable",
)


def venv_root() -> Path:
    """Where the cached client virtualenvs live."""
    configured = os.environ.get("FIRELOOP_COMPAT_VENVS")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fireloop" / "compat-venvs"


def ready_text(requirements: list[str]) -> str:
    """What a finished virtualenv's `READY` marker holds: its exact requirement list."""
    return json.dumps(requirements)


def requirements_digest(requirements: list[str]) -> str:
    """The part of a virtualenv's directory name that changes with its requirement list."""
    return hashlib.sha256(ready_text(requirements).encode()).hexdigest()[:12]


def compat_python(name: str, requirements: list[str]) -> Path:
    """The python of a cached virtualenv holding exactly `requirements`, built once.

    The directory name carries a digest of the requirement list and its `READY` marker holds
    the list itself, so changing a pin builds a new virtualenv instead of reusing a stale one.
    The build happens under a temporary name and is renamed into place once complete, so an
    interrupted build is never used.
    """
    venv = venv_root() / f"{name}-{requirements_digest(requirements)}"
    python = venv / "bin" / "python"
    ready = venv / "READY"
    if ready.is_file() and ready.read_text() == ready_text(requirements):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    install = subprocess.run(
        [str(building / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    if install.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        output = install.stdout + install.stderr
        if any(sign in output for sign in _UNREACHABLE):
            pytest.skip(f"package registry unreachable, {requirements} not installed")
        raise AssertionError(f"pip install {requirements} failed:\n{output}")
    (building / "READY").write_text(ready_text(requirements))
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


@dataclass(frozen=True)
class Backend:
    """A running `fireloop backend`: its base URL, the key it accepts and its log file."""

    url: str
    api_key: str
    log_path: Path


@contextmanager
def fireloop_backend(cwd: Path, api_key: str) -> Iterator[Backend]:
    """`fireloop backend` started as a user would: a subprocess, the key in FIREWORKS_API_KEY,
    its data directory under `cwd`; stopped on exit."""
    port = _free_port()
    env = os.environ | {"FIREWORKS_API_KEY": api_key}
    log_path = cwd / "backend.log"
    command = [sys.executable, "-m", "fireloop.cli", "backend", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--data-dir", "data"], cwd=cwd, env=env, stdout=log, stderr=log
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
        yield Backend(url=url, api_key=api_key, log_path=log_path)
    finally:
        process.terminate()
        process.wait(15)


@dataclass(frozen=True)
class ClientRun:
    """What a client script printed: its JSON report (the last stdout line) and all output."""

    report: dict[str, Any]
    output: str


def run_client(
    python: Path, script: Path, args: list[str], env: dict[str, str], timeout_s: float
) -> ClientRun:
    """Runs a client script with a compat virtualenv's python; fails with the script's output
    tails when it exits non-zero."""
    run = subprocess.run(
        [str(python), str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=os.environ | env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert isinstance(report, dict)
    return ClientRun(report=report, output=run.stdout + run.stderr)
