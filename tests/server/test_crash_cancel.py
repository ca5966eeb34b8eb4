"""A worker-run flow killed by SIGTERM, and one cancelled through the API, resume when the same
config runs again: under a real Prefect server (SQLite) and a process worker.

Two deployments of the SFT flow train against one standalone `fireloop backend` (it outlives
the flow processes, as the Fireworks platform would). Once a run's ledger holds its step-8
checkpoint (the next segment has begun), one flow process gets SIGTERM from the test, as an
eviction sends it; the other run is set Cancelling through the API, as the UI's cancel button
does, and the worker stops its process (SIGTERM after telling it, over its control channel, that
this is a cancel). Prefect retries neither. Each ledger then ends with an `attempt_end` row
(crashed / cancelled, teardown deferred, resume step), the server shows Crashed / Cancelled,
and a new flow run of the same deployment resumes from the ledger and trains every remaining
step once: its checkpoints follow the cadence with no name saved twice, and its metrics log
holds every step once. The module takes about two minutes: the server migrates SQLite (~20 s),
each of the four flow processes imports torch and Prefect (~10 s), and they share two cores.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling

from flows.sft import sft_flow
from tests.flows.support import jsonl
from tests.server.runs import deploy, ledger_rows, trigger, wait_for_terminal
from tests.server.support import (
    PlatformProcess,
    PrefectServer,
    Subprocess,
)

timings = logging.getLogger("tests.server.timings")
# The test waits for the module's servers and four flow processes: on a loaded 2-core machine
# that can pass the suite's 300 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POOL = "fireloop-crash"
RUN_TIMEOUT_S = 300.0
STEPS = 16
CHECKPOINT_EVERY = 8
CANCELLED_BATCH_SIZE = 256
# Two segments of eight steps, no deployment: the second segment is where the runs stop.
RUN: dict[str, Any] = {
    "max_steps": STEPS,
    "batch_size": 16,
    "checkpoint_every": CHECKPOINT_EVERY,
    "eval_every": 0,
    "sample_eval": False,
    "retry_delay_s": 0,
    "teardown": "delete",  # applied once the run completes, never on a crash or cancel
}


def _flow_process(worker: Subprocess, flow_run_id: UUID) -> int:
    """The pid of the worker's flow process (`python -m prefect.engine`) running `flow_run_id`:
    the one whose environment names it (Linux /proc)."""
    wanted = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == worker.process.pid and wanted in environ:
            return int(entry.name)
    raise AssertionError(f"no process of the worker runs flow run {flow_run_id}")


def _wait_for_checkpoint(run_dir: Path, next_step: int, worker: Subprocess) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if (run_dir / "ledger.jsonl").exists() and any(
            row["kind"] == "checkpoint" and row["next_step"] == next_step
            for row in ledger_rows(run_dir)
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step-{next_step} checkpoint in {run_dir}:\n{worker.log_tail()}")


def _config(platform: PlatformProcess, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "platform": {"base_url": platform.base_url},  # its key: the worker's environment
        **RUN,
        **overrides,
    }


def _assert_deferred(run_dir: Path, outcome: str) -> None:
    """The ledger ends with the attempt's `attempt_end`: no run_end, teardown deferred."""
    rows = ledger_rows(run_dir)
    (end,) = [row for row in rows if row["kind"] == "attempt_end"]
    assert (end["outcome"], end["teardown"]) == (outcome, "deferred"), end
    assert end["next_step"] == CHECKPOINT_EVERY
    assert not any(row["kind"] == "run_end" for row in rows)


def _assert_finished_once(run_dir: Path) -> None:
    """Every step trained once: no save named twice (a replayed one would be `step-8-a1`)."""
    rows = ledger_rows(run_dir)
    checkpoints = [row for row in rows if row["kind"] == "checkpoint"]
    assert [(row["name"], row["next_step"]) for row in checkpoints] == [
        ("step-8", 8),
        ("step-16", 16),
    ]
    assert rows[-1]["kind"] == "run_end" and rows[-1]["next_step"] == STEPS
    assert [m["step"] for m in jsonl(run_dir / "metrics.jsonl")] == list(range(STEPS))


def test_sigterm_and_cancel_defer_teardown_and_a_new_run_resumes(
    sqlite_server: PrefectServer,
    worker: Subprocess,
    platform: PlatformProcess,
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    crashed_dir, cancelled_dir = work / "runs" / "killed", work / "runs" / "cancelled"
    killed = deploy(
        sqlite_server, sft_flow, "killed", POOL, work, {"config": _config(platform, crashed_dir)}
    )
    cancelled = deploy(
        sqlite_server,
        sft_flow,
        "cancelled",
        POOL,
        work,
        # A cancel reaches the flow process through the worker's next poll (about a second
        # or two); larger batches keep the second segment (eight `tiny` steps) longer than that,
        # so the cancel lands before its save, as the assertions below expect.
        {"config": _config(platform, cancelled_dir, batch_size=CANCELLED_BATCH_SIZE)},
    )

    # Both at once: the worker runs them side by side, each in a process of its own.
    started = time.monotonic()
    killed_run, cancelled_run = trigger(sqlite_server, killed), trigger(sqlite_server, cancelled)
    _wait_for_checkpoint(crashed_dir, CHECKPOINT_EVERY, worker)
    os.kill(_flow_process(worker, killed_run), signal.SIGTERM)
    _wait_for_checkpoint(cancelled_dir, CHECKPOINT_EVERY, worker)
    with sqlite_server.client() as client:
        client.set_flow_run_state(cancelled_run, Cancelling(), force=True)
    state = wait_for_terminal(sqlite_server, killed_run, RUN_TIMEOUT_S, worker).state
    assert state is not None and state.type == StateType.CRASHED, state
    state = wait_for_terminal(sqlite_server, cancelled_run, RUN_TIMEOUT_S, worker).state
    assert state is not None and state.type == StateType.CANCELLED, state
    timings.info("crashed and cancelled %.1f s after their triggers", time.monotonic() - started)

    _assert_deferred(crashed_dir, "crashed")
    _assert_deferred(cancelled_dir, "cancelled")

    # The same deployments (same config, same run name) run again and resume.
    started = time.monotonic()
    reruns = [trigger(sqlite_server, killed), trigger(sqlite_server, cancelled)]
    for rerun in reruns:
        state = wait_for_terminal(sqlite_server, rerun, RUN_TIMEOUT_S, worker).state
        assert state is not None and state.is_completed(), state
    timings.info("both reruns finished %.1f s after their triggers", time.monotonic() - started)
    _assert_finished_once(crashed_dir)
    _assert_finished_once(cancelled_dir)
