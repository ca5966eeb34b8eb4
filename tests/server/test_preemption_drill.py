"""`fireloop backend --preempt-at-step`: the fault drill the server tests run a platform with.

The worker tests prove the drill end to end (a run is preempted at the step and resumes); these
check what a person sees before anything starts: the option says it is a drill, and a count
that no job can reach is refused instead of silently never firing.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fireloop.cli import app

WIDE = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def test_help_says_the_option_is_a_drill() -> None:
    result = CliRunner().invoke(app, ["backend", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "--preempt-at-step" in result.output
    assert "Fault drill" in result.output


def test_a_step_count_below_one_is_refused_before_serving(tmp_path: Path) -> None:
    data_dir = tmp_path / "platform"
    result = CliRunner().invoke(
        app,
        ["backend", "--port", "1", "--data-dir", str(data_dir), "--preempt-at-step", "0"],
        env=WIDE,
    )
    assert result.exit_code == 2
    assert "Invalid value for '--preempt-at-step'" in result.output
    assert "greater than or equal to 1" in result.output
    assert not data_dir.exists()  # refused before the platform touched anything
