"""`fireloop run sft` is quiet by default: the run's own lines, its progress and its summary.

Prefect's banners and per-task lines, third-party warnings and download-style progress bars
appear only with `--verbose`. Both runs start their own Prefect server (no PREFECT_API_URL), as
a user's first run does.
"""

from __future__ import annotations

from pathlib import Path

from tests.cli.support import cli_env, run_cli, sft_args

# What only --verbose may show.
NOISE = (
    "Starting temporary server",
    "Created flow run",
    "Beginning flow run",
    "Finished in state",
    "Task run",
    "| INFO",
    "FutureWarning",
    "DeprecationWarning",
    "it/s]",
)


def test_default_output_shows_the_run_and_no_noise(tmp_path: Path) -> None:
    done = run_cli(sft_args(tmp_path / "run", "quiet"), cli_env(tmp_path / "home", None), tmp_path)

    assert done.returncode == 0, done.stdout
    shown = [noise for noise in NOISE if noise in done.stdout]
    assert not shown, f"{shown} in the default output:\n{done.stdout}"
    assert "checkpoint step-3 saved" in done.stdout  # a cadence point's line
    assert "6/6" in done.stdout  # the progress bar
    assert "ledger" in done.stdout  # the summary


def test_verbose_output_adds_prefects_lines(tmp_path: Path) -> None:
    args = [*sft_args(tmp_path / "run", "verbose"), "--verbose"]
    done = run_cli(args, cli_env(tmp_path / "home", None), tmp_path)

    assert done.returncode == 0, done.stdout
    assert "Finished in state Completed" in done.stdout
    assert "Beginning flow run" in done.stdout
    assert "checkpoint step-3 saved" in done.stdout
