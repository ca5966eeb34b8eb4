"""The durable step-inputs log: what is written survives, a torn tail is cut, first entry wins."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from flows.step_inputs import STEP_INPUTS_FILENAME, StepInputsLog


def test_entries_survive_a_reopen_and_the_position_counts_them(tmp_path: Path) -> None:
    log = StepInputsLog(str(tmp_path / "run"))
    assert log.position == 0 and not (tmp_path / "run" / STEP_INPUTS_FILENAME).exists()
    log.append({"ref:0": [-1.5, -2.0], "ref:1": [-0.25, -3.0]})
    log.append({"ref:2": [0.0, -1.0]})
    reopened = StepInputsLog(str(tmp_path / "run"))
    assert reopened.position == 3 and len(reopened) == 3
    assert reopened.get("ref:1") == [-0.25, -3.0] and "ref:2" in reopened
    with pytest.raises(KeyError):
        reopened.get("ref:3")


def test_the_first_entry_of_a_key_wins_what_was_trained_on_is_never_replaced(
    tmp_path: Path,
) -> None:
    log = StepInputsLog(str(tmp_path))
    log.append({"step-0": [1, 2, 3]})
    log.append({"step-0": [9, 9, 9], "step-1": [4]})  # a second draw for step 0 is ignored
    assert log.get("step-0") == [1, 2, 3] and log.position == 2
    # A duplicate written by hand (another process) is skipped on read, yet counted.
    path = tmp_path / STEP_INPUTS_FILENAME
    with path.open("a") as handle:
        handle.write(json.dumps({"key": "step-1", "value": [7]}) + "\n")
    reread = StepInputsLog(str(tmp_path))
    assert reread.get("step-1") == [4] and reread.position == 3


def test_a_torn_last_line_is_cut_and_the_log_continues(tmp_path: Path) -> None:
    log = StepInputsLog(str(tmp_path))
    log.append({"a": 1, "b": 2})
    path = tmp_path / STEP_INPUTS_FILENAME
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"key": "c", "val')  # a crash in the middle of a write
    reopened = StepInputsLog(str(tmp_path))
    assert reopened.position == 2 and path.read_bytes() == whole
    reopened.append({"c": 3})
    assert StepInputsLog(str(tmp_path)).get("c") == 3


def test_lost_entries_are_named_when_a_checkpoint_recorded_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = StepInputsLog(str(tmp_path))
    log.append({"a": 1})
    with caplog.at_level(logging.WARNING, logger="fireloop.notice"):
        assert log.check_position(3, "checkpoint step-6") == 2
    assert "checkpoint step-6 recorded 3: 2 are gone" in caplog.text
    assert log.check_position(1, "checkpoint step-3") == 0
    assert log.check_position(None, "a run without a log") == 0


def test_an_fsspec_url_works_like_a_path(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/remote-run"
    StepInputsLog(url).append({"k": {"nested": [1.0]}})
    assert StepInputsLog(url).get("k") == {"nested": [1.0]}
