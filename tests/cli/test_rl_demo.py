"""`fireloop demo rl` as a user runs it: SFT warm start, then RL, then the reward curve.

The end-to-end test runs the real CLI in a subprocess (its own Prefect server, the embedded
platform under the test's directory), stops it with Ctrl-C during RL, resumes it with the
command it printed, and holds what it prints to what the runs wrote: the block means and the
sparkline to the RL run's `metrics.jsonl`, the evaluation table to its ledger. The helpers that
compact the curve are checked on hand-computed values.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from fireloop.cli import app
from fireloop.rl_demo_cli import reward_curve, sparkline
from fireloop.run_cli import print_report
from flows.ledger import HotloadRow, Ledger, RunHeader, ledger_path
from tests.cli.support import cli_env, ledger_rows, run_cli, start_cli

RL_STEPS = 10  # one checkpoint, at the end: a Ctrl-C mid-way resumes RL from its start
SFT_STEPS = 15  # the demo's warm start (RLDemoConfig.sft_steps)
# A stop takes seconds on an idle machine; the bound leaves room for a loaded CI machine.
STOP_TIMEOUT_S = 120


def _metric_lines(path: Path, rewards: list[float]) -> None:
    lines = [json.dumps({"step": i, "rollout/raw_reward": r}) for i, r in enumerate(rewards)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _interrupt_during_rl(tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    """Start the demo and press Ctrl-C once its RL run has trained a step; the exit code and
    the output."""
    log = tmp_path / "interrupted.log"
    env = env | {"PYTHONFAULTHANDLER": "1"}  # a stack dump on SIGABRT, should it hang
    process = start_cli(["demo", "rl", "--max-steps", str(RL_STEPS)], env, tmp_path, log)
    try:
        deadline = time.monotonic() + 180
        while not any(
            row.get("kind") == "hotload" and row.get("step", 0) >= 1
            for ledger in (tmp_path / "runs").glob("*/rl")
            for row in ledger_rows(ledger)
        ):
            assert process.poll() is None, log.read_text(encoding="utf-8")
            assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole group
        try:
            code = process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Still running: have faulthandler write every thread's stack into the log.
            os.killpg(process.pid, signal.SIGABRT)
            time.sleep(2)
            raise AssertionError(
                f"no exit {STOP_TIMEOUT_S} s after Ctrl-C:\n" + log.read_text(encoding="utf-8")
            ) from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return code, log.read_text(encoding="utf-8")


def test_demo_rl_stops_on_ctrl_c_resumes_and_prints_the_curve_and_evaluations(
    tmp_path: Path,
) -> None:
    env = cli_env(tmp_path / "home", None)  # the CLI starts its own Prefect server

    code, stopped = _interrupt_during_rl(tmp_path, env)

    assert code == 130, stopped
    assert "to resume, run (from this directory):" in stopped
    command = stopped.split("to resume, run (from this directory):", 1)[1].split()
    assert command[:3] == ["fireloop", "demo", "rl"]
    assert "Traceback" not in stopped

    done = run_cli(command[1:], env, tmp_path, timeout_s=180)

    out = done.stdout
    assert done.returncode == 0, out
    assert "Traceback" not in out
    assert "Finished in state" not in out, "Prefect's own lines belong to --verbose"
    (root,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"demo-rl-\d{8}-\d{6}", root.name)
    assert f"run {root.name}-sft is already complete" in out  # not trained twice
    sft_dir, rl_dir = root / "sft", root / "rl"
    for run_dir, steps in ((sft_dir, SFT_STEPS), (rl_dir, RL_STEPS)):
        last = ledger_rows(run_dir)[-1]
        assert last["kind"] == "run_end", run_dir
        assert last["next_step"] == steps
        assert re.search(rf"^\s+\w+ run\s+{re.escape(str(run_dir))}$", out, re.MULTILINE)

    # The curve: one block of every step, whose mean is that of metrics.jsonl (each step
    # once, the replayed ones included), and one spark per step.
    rows = [json.loads(line) for line in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["rollout/raw_reward"] for row in rows]
    assert [row["step"] for row in rows] == list(range(RL_STEPS))
    assert "RL reward: rollout/raw_reward, mean per 10 steps" in out
    assert re.search(rf"┃ steps\s+┃\s+0-{RL_STEPS - 1} ┃", out)  # a heading row: heavy rules
    assert re.search(rf"│ reward\s+│\s+{sum(rewards) / RL_STEPS:.3f} │", out)
    spark = re.search(r"^  ([▁▂▃▄▅▆▇█]+)  \(one per step; ▁ 0 … █ 1\)$", out, re.MULTILINE)
    assert spark is not None, out
    assert spark.group(1) == sparkline(rewards, 0.0, 1.0)

    # The held-out evaluations: the ledger's rows (before step 0 and after the last step).
    evaluations = [row for row in ledger_rows(rl_dir) if row["kind"] == "evaluation"]
    assert [row["step"] for row in evaluations][-1] == RL_STEPS
    assert re.search(r"┃ step ┃ reward ┃ accuracy ┃ pass@1 ┃ pass@4 ┃", out)
    for row in evaluations:
        metrics = row["metrics"]
        cells = r" │\s+".join(
            re.escape(f"{metrics[key]:.3f}")
            for key in ("eval/reward", "eval/accuracy", "eval/pass@1", "eval/pass@4")
        )
        assert re.search(rf"│\s+{row['step']} │\s+{cells} │", out), out


def test_reward_curve_means_blocks_of_ten_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rewards = [0.0] * 10 + [1.0] * 10 + [0.5] * 5
    _metric_lines(path, rewards)

    curve = reward_curve(path)

    assert curve.rewards == rewards
    assert curve.block == 10
    assert curve.block_means == [(0, 9, 0.0), (10, 19, 1.0), (20, 24, 0.5)]


def test_a_long_run_stays_at_about_ten_blocks(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _metric_lines(path, [float(i % 2) for i in range(250)])

    curve = reward_curve(path)

    assert curve.block == 30
    assert len(curve.block_means) == 9
    assert curve.block_means[-1] == (240, 249, 0.5)


def test_sparkline_maps_the_range_onto_eight_blocks() -> None:
    assert sparkline([0.0, 0.5, 1.0, 0.25], 0.0, 1.0) == "▁▅█▃"
    assert sparkline([2.0, 2.0], 2.0, 2.0) == "▁▁"  # no range: all lowest
    assert sparkline([-1.0, 3.0], 0.0, 1.0) == "▁█"  # outside the range: clamped


def test_demo_options_that_do_not_fit_the_recipe_are_refused() -> None:
    runner = CliRunner()

    unknown = runner.invoke(app, ["demo", "dpo"])
    loss_for_sft = runner.invoke(app, ["demo", "--policy-loss", "grpo"])
    smoke_for_rl = runner.invoke(app, ["demo", "rl", "--smoke"])

    assert unknown.exit_code == 2
    assert "unknown demo 'dpo'; known: sft, rl" in unknown.output
    assert loss_for_sft.exit_code == 2
    assert "--policy-loss and --name are options of `demo rl`" in loss_for_sft.output
    assert smoke_for_rl.exit_code == 2


def test_an_unknown_policy_loss_is_refused_before_anything_runs(tmp_path: Path) -> None:
    done = run_cli(
        ["demo", "rl", "--policy-loss", "ppo"], cli_env(tmp_path / "home", None), tmp_path
    )

    assert done.returncode == 2, done.stdout
    assert "policy_loss" in done.stdout and "'ppo'" in done.stdout
    assert not (tmp_path / "runs").exists()


def test_a_run_that_hotloads_every_step_lists_its_first_and_last_hotloads(tmp_path: Path) -> None:
    header = RunHeader(
        run_id="rl-many",
        recipe="rl",
        config_hash="sha256:cfg",
        base_model="fireloop/tiny",
        tokenizer_model="fireloop/tiny",
        lora_rank=0,
        dataset_fingerprint="sha256:data",
    )
    ledger = Ledger.open(tmp_path, header)
    for step in range(21):
        kind = "base" if step == 0 else "delta"
        ledger.append(
            HotloadRow(
                identity=f"snap-{step}",
                deployment="d",
                verified=True,
                step=step,
                checkpoint_type=kind,
            )
        )
    console = Console(record=True, width=120, color_system=None)

    print_report(str(ledger_path(tmp_path)), console)

    text = console.export_text()
    shown = re.findall(r"snap-(\d+)", text)
    assert shown == ["0", "1", "2", "3", "17", "18", "19", "20"]
    assert re.search(r"│ …\s+│ 13 more\s+│\s+│ all yes\s+│", text), text
