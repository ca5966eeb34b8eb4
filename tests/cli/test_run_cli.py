"""What `fireloop run sft` tells its user: errors as messages, and a summary that is true.

A known user error is one message and exit code 2 (fast, under the default flow retries);
any other failure keeps its traceback and exits 1; rich markup never eats a message's
brackets. A finished run's summary says where its checkpoints, ledger and metrics are, how to
export it, and that the embedded platform's trainer and deployment are gone; running it again
says it is already complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from algorithms.datasets import DatasetError, DatasetProblem
from fireloop.run_cli import EXIT_FAILURE, EXIT_USER_ERROR, RunRequest, report_failure
from flows.config import SFTConfig
from sdk.errors import ConfigError
from tests.cli.support import cli_env, ledger_rows, prefect_server, run_cli, sft_args

FAIL_FAST_S = 60.0  # a retried user error used to take about 70 s, three attempts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        yield api_url


def recording_console() -> Console:
    return Console(record=True, width=200, color_system=None)


def test_config_error_prints_its_brackets_and_exits_2(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as invalid:
        SFTConfig(run_name="Bad_Name")
    pattern = invalid.value.errors()[0]["ctx"]["pattern"]  # '^[a-z0-9]([a-z0-9-]{0,38}…'

    done = run_cli(
        sft_args(tmp_path / "run", "Bad_Name"), cli_env(tmp_path / "home", None), tmp_path
    )

    assert done.returncode == EXIT_USER_ERROR, done.stdout
    assert pattern in done.stdout
    assert "Traceback" not in done.stdout


def test_user_error_in_the_flow_is_one_message_in_seconds(tmp_path: Path, server: str) -> None:
    missing = tmp_path / "no-such-data.jsonl"
    args = sft_args(tmp_path / "run", "missing", dataset=missing)  # default flow_retries
    started = time.monotonic()
    done = run_cli(args, cli_env(tmp_path / "home", server), tmp_path)
    took = time.monotonic() - started

    assert done.returncode == EXIT_USER_ERROR, done.stdout
    assert str(missing) in done.stdout
    assert "Traceback" not in done.stdout
    assert took < FAIL_FAST_S, f"{took:.0f} s\n{done.stdout}"


def test_user_errors_print_as_their_message_with_brackets() -> None:
    console = recording_console()
    message = "run_name: String should match pattern '^({0,38})?$' [type=string_pattern]"

    code = report_failure(ConfigError(message), console)

    assert code == EXIT_USER_ERROR
    text = console.export_text()
    assert message in text
    assert "Traceback" not in text


def test_other_failures_keep_their_traceback_and_exit_1() -> None:
    console = recording_console()
    try:
        raise RuntimeError("an unexpected [bug]")
    except RuntimeError as exc:
        code = report_failure(exc, console)

    assert code == EXIT_FAILURE
    text = console.export_text()
    assert "Traceback" in text
    assert "RuntimeError: an unexpected [bug]" in text
    assert "test_other_failures_keep_their_traceback_and_exit_1" in text


def test_dataset_errors_are_user_errors() -> None:
    console = recording_console()
    problem = DatasetProblem("data.jsonl", 3, "messages[0]", "not JSON [expected an object]")

    assert report_failure(DatasetError([problem]), console) == EXIT_USER_ERROR
    assert "data.jsonl:3: messages[0]: not JSON [expected an object]" in console.export_text()


def test_finished_run_summary_tells_the_truth_and_a_rerun_is_already_complete(
    tmp_path: Path, server: str
) -> None:
    run_dir = tmp_path / "run"
    args = sft_args(run_dir, "summary")
    env = cli_env(tmp_path / "home", server)

    done = run_cli(args, env, tmp_path)

    assert done.returncode == 0, done.stdout
    out = done.stdout
    checkpoint = next(row for row in ledger_rows(run_dir) if row["kind"] == "checkpoint")
    checkpoints_dir = run_dir / "platform" / "jobs" / checkpoint["job_id"] / "checkpoints"
    assert checkpoints_dir.is_dir()
    for place in (checkpoints_dir, run_dir / "ledger.jsonl", run_dir / "metrics.jsonl"):
        assert str(place) in out, f"{place} not in the summary:\n{out}"
    assert f"fireloop export {run_dir} --out" in out
    assert "keeping" not in out
    assert "stopped with this process" in out

    again = run_cli(args, env, tmp_path)

    assert again.returncode == 0, again.stdout
    assert "already complete" in again.stdout
    assert "0/6" not in again.stdout  # no progress bar for a run with nothing left to do
    assert f"fireloop export {run_dir} --out" in again.stdout


def test_the_resume_command_names_the_run_and_never_prints_a_key() -> None:
    request = RunRequest(
        {"max_steps": 5, "platform": {"api_key": "fw-secret-123456"}},
        config_file=Path("my run.yaml"),
        assignments=("max_steps=5", "platform.api_key=fw-secret-123456"),
    )

    command = request.rerun_command("sft-20261205-093000-ab12")

    assert command == (
        "fireloop run sft --config 'my run.yaml' --set max_steps=5 "
        "--set 'platform.api_key=<your key>' --set run_name=sft-20261205-093000-ab12"
    )
    named = RunRequest({"run_name": "mine"}, assignments=("run_name=mine",))
    assert named.rerun_command("mine") == "fireloop run sft --set run_name=mine"
