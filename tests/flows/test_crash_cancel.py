"""A run killed mid-segment (SIGTERM as an eviction sends it, or SIGKILL as an OOM kill) and
started again with the same config resumes from its ledger: no step lost, none repeated.

The killed run is a real flow run in a child process (`python -c`, `run_sft` against the
session's Prefect test server and this module's local platform, which outlives it). The child
stops in the middle of a segment (its progress callback marks the step and waits), and the test
sends the signal. SIGTERM reaches the flow as Prefect's `TerminationSignal`: the attempt's frame
writes an `attempt_end` row (crashed, teardown deferred, the step a rerun resumes from) and
Prefect marks the run Crashed; SIGKILL leaves neither, and the lock file still names the dead
holder. The same config run again in this process must then train exactly the steps after the
last checkpoint, and its per-step losses and rows must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import TerminationSignal
from prefect.settings import PREFECT_API_URL

from backend import LocalPlatform
from flows.attempt_end import attempt_outcome, record_attempt_end
from flows.config import PlatformConfig, SFTConfig
from flows.ledger import AttemptEndRow, CheckpointRow, Ledger, RunEndRow, RunHeader, read_ledger
from flows.monitoring import Progress
from flows.run_lock import LOCK_FILENAME
from flows.sft import run_sft
from tests.flows.conftest import sft_config
from tests.flows.support import jsonl

pytestmark = pytest.mark.usefixtures("prefect_server")

STEPS = 10
CHECKPOINT_EVERY = 4
STOP_AT = 6  # inside the segment of steps 4-7, after the step-4 checkpoint
CHILD_START_TIMEOUT_S = 120  # imports torch and Prefect, builds the tiny model: slow on 2 cores

# The child: the run, stopped inside a segment until the test's signal arrives.
CHILD = """
import os, sys, time
from pathlib import Path
from flows.config import SFTConfig
from flows.sft import run_sft

config = SFTConfig.model_validate_json(Path(sys.argv[1]).read_text())
marker, stop_at = Path(sys.argv[2]), int(sys.argv[3])

def on_progress(progress):
    if progress.step == stop_at:
        marker.write_text(str(os.getpid()))
        time.sleep(300)  # the signal lands here, mid-segment

run_sft(config, on_progress)
sys.exit(3)  # not reached: the signal ends the run
"""


def _config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> SFTConfig:
    # The key comes from FIREWORKS_API_KEY: the child receives the config as JSON, where a
    # key given in the config would be masked.
    fields = {"max_steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY} | overrides
    config = sft_config(None, run_dir, **fields)
    return config.model_copy(update={"platform": PlatformConfig(base_url=platform.base_url)})


@pytest.fixture(autouse=True)
def _platform_key(platform: LocalPlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", platform.api_key)


@pytest.fixture(scope="module")
def reference(platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the same training: its run directory."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    os.environ["FIREWORKS_API_KEY"] = platform.api_key  # module scope: no monkeypatch here
    try:
        run_sft(_config(platform, run_dir))
    finally:
        del os.environ["FIREWORKS_API_KEY"]
    return run_dir


def _kill_mid_segment(config: SFTConfig, tmp_path: Path, signum: signal.Signals) -> int:
    """Run `config` in a child process, send `signum` at step STOP_AT; the child's exit code."""
    config_file, marker = tmp_path / "config.json", tmp_path / "stopped-at"
    config_file.write_text(config.model_dump_json())
    env = os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config_file), str(marker), str(STOP_AT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + CHILD_START_TIMEOUT_S
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the child never reached step {STOP_AT}: {_output(child)}"
        child.send_signal(signum)
        child.wait(60)
        return child.returncode
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        (tmp_path / "child-output.txt").write_text(_output(child))


def _output(child: subprocess.Popen[str]) -> str:
    if child.poll() is None or child.stdout is None:
        return "(still running)"
    return child.stdout.read()[-4000:]


def _flow_run_state(flow_run_id: str) -> StateType | None:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state  # type: ignore[arg-type]
    return state.type if state else None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_run_killed_mid_segment_resumes_when_started_again(
    platform: LocalPlatform, reference: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    run_dir = tmp_path / "killed"
    # `delete`: applied only once the run completes; a crash keeps the trainer for the rerun.
    config = _config(platform, run_dir, teardown="delete")
    code = _kill_mid_segment(config, tmp_path, signum)
    assert code != 0

    rows = read_ledger(run_dir)
    checkpoints = [row for row in rows if isinstance(row, CheckpointRow)]
    assert [c.name for c in checkpoints] == [f"step-{CHECKPOINT_EVERY}"]
    assert not any(isinstance(row, RunEndRow) for row in rows)
    ends = [row for row in rows if isinstance(row, AttemptEndRow)]
    if signum == signal.SIGTERM:
        (end,) = ends
        assert (end.outcome, end.teardown, end.next_step) == ("crashed", "deferred", 4)
        assert end.reason == "termination signal SIGTERM"
        assert end.flow_run_id is not None
        assert _flow_run_state(end.flow_run_id) == StateType.CRASHED
    else:
        assert ends == []  # nothing runs after SIGKILL
        holder = json.loads((run_dir / LOCK_FILENAME).read_text())
        assert holder["pid"] != os.getpid()  # the dead child still "holds" it, on paper only

    trained: list[int] = []

    def on_progress(progress: Progress) -> None:
        trained.append(progress.step)

    result = run_sft(config, on_progress)
    assert result.steps_done == STEPS and not result.already_complete
    assert trained == list(range(CHECKPOINT_EVERY, STEPS))  # from the checkpoint, once each
    assert result.trainer_after == "deleted"  # the policy, applied when the run completed

    rows = read_ledger(run_dir)
    assert isinstance(rows[-1], RunEndRow)
    assert [c.next_step for c in rows if isinstance(c, CheckpointRow)] == [4, 8, 10]
    expected = jsonl(reference / "metrics.jsonl")
    actual = jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in actual] == list(range(STEPS))
    assert [m["train/ce_loss"] for m in actual] == [m["train/ce_loss"] for m in expected]
    assert [m["row_indices"] for m in actual] == [m["row_indices"] for m in expected]


def _ledger(run_dir: Path) -> Ledger:
    header = RunHeader(
        run_id="r",
        recipe="sft",
        config_hash="sha256:0",
        base_model="fireloop/tiny",
        tokenizer_model="fireloop/tiny",
        lora_rank=8,
        dataset_fingerprint="d",
    )
    return Ledger.open(run_dir, header)


def test_the_attempt_end_row_names_the_signal_and_masks_secrets(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    assert attempt_outcome(TerminationSignal(signal.SIGTERM)) == "crashed"  # no cancel intent
    assert attempt_outcome(KeyboardInterrupt()) == "interrupted"
    record_attempt_end(ledger, SystemExit("exit with fw-secret-123456"), lambda t: t[:10] + "***")
    (end,) = [row for row in read_ledger(tmp_path) if isinstance(row, AttemptEndRow)]
    assert (end.outcome, end.teardown, end.next_step) == ("crashed", "deferred", 0)
    assert end.reason == "SystemExit***"


def test_a_failed_attempt_end_append_never_replaces_the_signal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = _ledger(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")  # the disk under the ledger went away
    record_attempt_end(ledger, KeyboardInterrupt(), str)  # logs, does not raise
    assert "could not record the end of this attempt" in caplog.text
    assert not (tmp_path / "gone").exists()
