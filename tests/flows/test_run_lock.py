"""One run directory, one run: a live holder refuses a second flow at once, a dead one does not.

The holder is a real second process, as a second `fireloop run` would be; killing it with
SIGKILL (no cleanup of any kind) must free the directory, since the kernel drops its lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import LocalPlatform
from flows.failures import RunDirInUseError, is_user_error
from flows.run_lock import LOCK_FILENAME, hold_run_dir, release_run_dir
from flows.sft import configured_sft_flow
from tests.flows.conftest import sft_config
from tests.flows.support import read_run

HOLDER = """
import sys, time
from flows.run_lock import hold_run_dir
hold_run_dir(sys.argv[1], "holder-flow-run")
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A second process holding the lock of `tmp_path/held`."""
    run_dir = tmp_path / "held"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    yield run_dir, process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


@pytest.mark.usefixtures("prefect_server")
def test_a_second_flow_on_a_run_dir_in_use_is_refused_at_once(
    platform: LocalPlatform, holder: tuple[Path, subprocess.Popen[str]]
) -> None:
    run_dir, process = holder
    # The default retry settings: a refusal must not be retried.
    config = sft_config(platform, run_dir, flow_retries=2, retry_delay_s=30)
    started = time.monotonic()
    state = configured_sft_flow(config)(config, return_state=True)
    assert time.monotonic() - started < 10
    assert state.is_failed()
    with pytest.raises(RunDirInUseError) as caught:
        state.result()
    message = str(caught.value)
    assert f"pid {process.pid} on " in message and "since 20" in message
    assert "holder-flow-run" in message and str(run_dir) in message
    assert is_user_error(caught.value)
    assert read_run(state).run_count == 1
    assert not (run_dir / "ledger.jsonl").exists()  # refused before the ledger was opened


def test_the_lock_dies_with_its_holder(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    run_dir, process = holder
    with pytest.raises(RunDirInUseError):
        hold_run_dir(str(run_dir), "me")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    hold_run_dir(str(run_dir), "me")  # no stale lock left behind
    try:
        assert "me" in (run_dir / LOCK_FILENAME).read_text(encoding="utf-8")
    finally:
        release_run_dir(str(run_dir))


def test_a_flow_run_keeps_its_lock_across_retries_and_other_runs_are_refused(
    tmp_path: Path,
) -> None:
    run_dir = str(tmp_path / "run")
    hold_run_dir(run_dir, "flow-run-a")
    try:
        hold_run_dir(run_dir, "flow-run-a")  # its own retry: no refusal
        with pytest.raises(RunDirInUseError, match="flow run flow-run-a"):
            hold_run_dir(run_dir, "flow-run-b")  # another flow run of this process
    finally:
        release_run_dir(run_dir)
    hold_run_dir(run_dir, "flow-run-b")
    release_run_dir(run_dir)


def test_a_remote_run_dir_is_not_locked() -> None:
    hold_run_dir("memory://runs/remote", "flow-run-a")
    hold_run_dir("memory://runs/remote", "flow-run-b")  # no lock on object stores
    release_run_dir("memory://runs/remote")
