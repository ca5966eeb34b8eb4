"""Running the real `fireloop` CLI in a subprocess, and reading back what its run left.

Each CLI process gets its own PREFECT_HOME, and either a Prefect server the test owns
(PREFECT_API_URL) or none, so the CLI starts its own. Runs are small runs of the tiny model on
the reversal tasks (SFT) or their pairs (DPO, ORPO), on the embedded platform under the test's
temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fireloop.prefect_server import TemporaryPrefectServer

ROOT = Path(__file__).resolve().parents[2]
FIRELOOP = [sys.executable, "-m", "fireloop.cli"]


def cli_env(home: Path, api_url: str | None) -> dict[str, str]:
    """The CLI's environment: offline, its own PREFECT_HOME, the given Prefect API or none."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url or "",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    # The test process's own quiet settings must not hide what the CLI prints by default.
    for key in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_LOGGING_LEVEL", "COLUMNS"):
        env.pop(key, None)
    env["COLUMNS"] = "200"  # one line per notice, however long
    return env


def sft_args(run_dir: Path, run_name: str, **fields: object) -> list[str]:
    """`run sft` with a small, fast config (overridable by `fields`)."""
    config: dict[str, object] = {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "max_steps": 6,
        "checkpoint_every": 3,
        "batch_size": 8,
        "eval_every": 0,
        "eval_size": 16,
        "sample_eval": "false",
    } | fields
    args = ["run", "sft"]
    for key, value in config.items():
        args += ["--set", f"{key}={value}"]
    return args


def preference_args(recipe: str, run_dir: Path, run_name: str, **fields: object) -> list[str]:
    """`run dpo` or `run orpo` with a small, fast config on `reverse_pairs` (overridable)."""
    config: dict[str, object] = {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "max_steps": 4,
        "checkpoint_every": 2,
        "batch_size": 4,
        "eval_every": 0,
        "eval_size": 8,
    } | fields
    args = ["run", recipe]
    for key, value in config.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run `fireloop <args>` to the end; stdout and stderr together."""
    return subprocess.run(
        [*FIRELOOP, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_cli(
    args: list[str], env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """Start `fireloop <args>` as a terminal would: the leader of its own process group."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*FIRELOOP, *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def ledger_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written
            continue
    return rows


def wait_for_checkpoint_row(
    run_dir: Path, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 180
) -> None:
    """Until the run's ledger has a checkpoint row (the run is mid-way and resumable)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(row.get("kind") == "checkpoint" for row in ledger_rows(run_dir)):
            return
        if process.poll() is not None:
            pytest.fail(f"the CLI exited ({process.returncode}) early:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint row within {timeout_s} s:\n{log.read_text()}")


def training_trace(run_dir: Path) -> list[tuple[Any, ...]]:
    """Per step: the step, its rows and its losses, exactly as metrics.jsonl has them."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line]
    return [
        (r["step"], r["row_indices"], r["train/loss"], r["train/ce_loss"], r["train/grad_norm"])
        for r in rows
    ]


def final_weights(run_dir: Path) -> bytes:
    """The bytes of the model weights file of the run's last ledger checkpoint."""
    checkpoints = [row for row in ledger_rows(run_dir) if row.get("kind") == "checkpoint"]
    last = checkpoints[-1]
    path = run_dir / "platform" / "jobs" / last["job_id"] / "checkpoints" / last["name"]
    return (path / "weights.safetensors").read_bytes()


def flow_run_states(api_url: str, flow_run_name: str) -> list[str]:
    """The state types of the flow runs called `flow_run_name`, as the Prefect server has them."""
    response = httpx.post(
        f"{api_url}/flow_runs/filter",
        json={"flow_runs": {"name": {"any_": [flow_run_name]}}},
        timeout=30,
    )
    response.raise_for_status()
    return [run["state"]["type"] for run in response.json()]


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A Prefect server for the test (the CLI's own kind), its database under `home`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(home))
        patch.delenv("PREFECT_API_URL", raising=False)
        server = TemporaryPrefectServer.launch()
    try:
        server.wait_ready()
        yield server.api_url
    finally:
        server.stop()
