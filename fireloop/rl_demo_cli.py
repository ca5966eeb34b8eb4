"""`fireloop demo rl`: the SFT warm start and the RL run of the RL demo, and its reward curve.

The demo is one parent Prefect flow with two subflows (`flows/rl_demo.py`); this module runs it
the way `fireloop run` runs a recipe (quiet, a progress bar per phase, Ctrl-C within seconds)
and ends with what a person wants to see of RL: the per-step reward, compacted into block means
and a sparkline, the held-out evaluations, and where the two runs live.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fireloop.interrupts import interrupt_exit_code
from fireloop.prefect_server import PrefectApi
from fireloop.quiet import configure_output, printing_notices
from fireloop.run_cli import (
    EXIT_USER_ERROR,
    StepBar,
    print_error,
    report_failure,
    with_prefect,
)

if TYPE_CHECKING:
    from flows.monitoring import Progress as StepProgress
    from flows.rl_demo import RLDemoConfig, RLDemoResult

__all__ = ["RLDemoRequest", "reward_curve", "run_rl_demo", "sparkline"]

REWARD_METRIC: Final = "rollout/raw_reward"
SPARKS: Final = "▁▂▃▄▅▆▇█"
# Evaluation columns a person reads first; pass@k columns follow, whatever k the run used.
_EVAL_COLUMNS: Final = ("eval/reward", "eval/accuracy")


@dataclass(frozen=True)
class RLDemoRequest:
    """The demo as typed: RL steps, the policy loss, the name of a demo to resume, and
    whether to show Prefect's output."""

    rl_steps: int | None = None  # None: the demo's default
    policy_loss: str | None = None
    name: str | None = None  # None: a new demo
    verbose: bool = False
    runs_dir: str = "runs"

    def config(self, name: str) -> RLDemoConfig:
        from flows.rl_demo import RLDemoConfig

        fields: dict[str, object] = {"name": name, "runs_dir": self.runs_dir}
        if self.rl_steps is not None:
            fields["rl_steps"] = self.rl_steps
        if self.policy_loss is not None:
            fields["policy_loss"] = self.policy_loss
        return RLDemoConfig.model_validate(fields)


def demo_name() -> str:
    return "demo-rl-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def run_rl_demo(request: RLDemoRequest, console: Console) -> int:
    """Run the RL demo with a progress bar per phase, then print its reward curve; the exit
    code (2 for a bad option, 130 / 143 when interrupted)."""
    configure_output(verbose=request.verbose)
    name = demo_name() if request.name is None else request.name
    console.print(
        "[bold]fireloop demo rl[/]: SFT of fireloop/tiny on addition, then RL from its checkpoint, "
        "rewarded for right sums; embedded local platform"
    )
    # Nothing may import Prefect before the Prefect API is chosen: it reads its settings once.
    return with_prefect(console, lambda api: _run(request, name, api, console))


def _run(request: RLDemoRequest, name: str, api: PrefectApi, console: Console) -> int:
    try:
        config = _checked(request.config(name))
    except (ValidationError, ValueError) as exc:
        print_error(console, f"invalid RL demo options:\n{exc}")
        return EXIT_USER_ERROR
    root = Path(config.runs_dir, config.name)
    console.print(
        Text(
            f"SFT: {config.sft_steps} steps; RL: {config.policy_loss}, {config.rl_steps} steps; "
            f"runs under {root}",
            style="dim",
        ),
        soft_wrap=True,
    )
    from flows.monitoring import progress_listener
    from flows.rl_demo import rl_demo_flow

    api.wait_ready()
    bars = PhaseBars(console, config.name)
    with printing_notices(console):
        try:
            try:
                with progress_listener(bars.on_progress):
                    result = rl_demo_flow(config)
            finally:
                bars.close()
        except BaseException as exc:
            code = interrupt_exit_code(exc)
            if code is not None:
                _print_interrupted(console, config, code)
                return code
            if not isinstance(exc, Exception):
                raise
            return report_failure(exc, console)
    print_demo_summary(result, console)
    return 0


def _checked(config: RLDemoConfig) -> RLDemoConfig:
    """`config`, once both runs' configs validate (a bad loss name is refused here, in a
    second, instead of after the SFT run)."""
    from flows.config import PlatformConfig
    from flows.rl_demo import rl_demo_configs

    # A placeholder platform: the demo starts its embedded one only once the flow runs.
    rl_demo_configs(config, PlatformConfig(base_url="http://127.0.0.1:1"), start="job:step-1")
    return config


class PhaseBars:
    """One progress bar per phase of the demo: the SFT run's, then the RL run's (a phase is
    known by its headline metric)."""

    def __init__(self, console: Console, name: str) -> None:
        from flows.config import RLConfig, SFTConfig

        self.console = console
        self.phases = {
            SFTConfig.headline_metric: ("sft", f"{name}-sft"),
            RLConfig.headline_metric: ("rl", f"{name}-rl"),
        }
        self._bar: StepBar | None = None
        self._metric: str | None = None

    def on_progress(self, step: StepProgress) -> None:
        if step.headline_metric != self._metric:
            if self._bar is not None:
                self._bar.close()
            recipe, run = self.phases.get(step.headline_metric, ("?", "?"))
            self._bar = StepBar(self.console, recipe, run, step.total_steps)
            self._metric = step.headline_metric
        assert self._bar is not None
        self._bar.on_progress(step)
        if step.step + 1 >= step.total_steps:  # the phase's last step: its bar ends here
            self._bar.close()
            self._bar, self._metric = None, None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _print_interrupted(console: Console, config: RLDemoConfig, code: int) -> None:
    """Where the stopped demo's runs are, and the command that resumes it (each run resumes
    from its last checkpoint; a finished SFT run is not trained again)."""
    what = "Ctrl-C" if code == 130 else "SIGTERM"
    root = Path(config.runs_dir, config.name).absolute()
    stopped = f"\nstopped by {what}: demo {config.name} was not finished; its runs are under {root}"
    console.print(Text(stopped), soft_wrap=True)
    console.print(Text("to resume, run (from this directory):", style="bold"))
    command = shlex.join(
        [
            "fireloop",
            "demo",
            "rl",
            "--max-steps",
            str(config.rl_steps),
            "--policy-loss",
            config.policy_loss,
            "--name",
            config.name,
        ]
    )
    console.print(Text(f"  {command}"), soft_wrap=True)


@dataclass(frozen=True)
class RewardCurve:
    """Per-step rewards of a run and their means over blocks of `block` steps."""

    rewards: list[float]
    block: int
    block_means: list[tuple[int, int, float]]  # first step, last step, mean


def reward_curve(metrics_path: str | Path, metric: str = REWARD_METRIC) -> RewardCurve:
    """The run's per-step `metric` from its `metrics.jsonl`, in blocks of 10 steps (of more,
    so that a long run stays at about ten blocks)."""
    rewards: list[float] = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            value = json.loads(line).get(metric)
            if isinstance(value, int | float) and math.isfinite(value):
                rewards.append(float(value))
    block = 10 * max(1, math.ceil(len(rewards) / 100))
    means = [
        (start, min(start + block, len(rewards)) - 1, _mean(rewards[start : start + block]))
        for start in range(0, len(rewards), block)
    ]
    return RewardCurve(rewards, block, means)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sparkline(values: Sequence[float], low: float, high: float) -> str:
    """One block character per value, `low` the lowest and `high` the highest."""
    span = high - low
    if span <= 0:
        return SPARKS[0] * len(values)
    top = len(SPARKS) - 1
    return "".join(SPARKS[max(0, min(top, round((v - low) / span * top)))] for v in values)


def print_demo_summary(result: RLDemoResult, console: Console) -> None:
    """The RL run's reward curve and held-out evaluations, then where both runs live."""
    curve = reward_curve(result.rl.metrics_path)
    if curve.rewards:
        _print_curve(curve, console)
    _print_evaluations(result.rl.ledger_path, console)
    for label, path in (("SFT run", result.sft.run_dir), ("RL run", result.rl.run_dir)):
        console.print(Text(f"  {label:<8} {path}"), soft_wrap=True)
    console.print(
        Text(
            "the embedded platform stopped with this process; both runs' checkpoints stay "
            "under their run directories (fireloop export <run dir> --out <dir>)"
        ),
        soft_wrap=True,
    )


def _print_curve(curve: RewardCurve, console: Console) -> None:
    console.print(Text(f"RL reward: rollout/raw_reward, mean per {curve.block} steps", "bold"))
    table = Table()
    table.add_column("steps")
    for first, last, _ in curve.block_means:
        table.add_column(f"{first}-{last}" if last > first else str(first), justify="right")
    table.add_row("reward", *(f"{mean:.3f}" for _, _, mean in curve.block_means))
    console.print(table)
    # Per step while it fits on a line, else one character per block.
    per_step = len(curve.rewards) <= 100
    values = curve.rewards if per_step else [mean for *_, mean in curve.block_means]
    low, high = min(0.0, *values), max(1.0, *values)  # rewards of the toy tasks are in [0, 1]
    unit = "step" if per_step else "block"
    line = f"  {sparkline(values, low, high)}  (one per {unit}; ▁ {low:g} … █ {high:g})"
    console.print(Text(line), soft_wrap=True)
    if len(curve.rewards) >= 40:
        early, late = _mean(curve.rewards[:20]), _mean(curve.rewards[-20:])
        console.print(
            Text(f"  first 20 steps {early:.3f} → last 20 steps {late:.3f} ({late - early:+.3f})")
        )


def _print_evaluations(ledger_path: str, console: Console) -> None:
    """The RL run's held-out evaluations (the weights before the step) from its ledger."""
    from flows.ledger import EvaluationRow, read_ledger

    rows = [r for r in read_ledger(str(Path(ledger_path).parent)) if isinstance(r, EvaluationRow)]
    if not rows:
        return
    names = {name for row in rows for name in row.metrics}
    pass_k = sorted(
        (n for n in names if n.startswith("eval/pass@")), key=lambda n: int(n.split("@")[1])
    )
    columns = [n for n in _EVAL_COLUMNS if n in names] + pass_k
    console.print(Text("RL held-out evaluation (the weights before the step)", "bold"))
    table = Table()
    table.add_column("step", justify="right")
    for column in columns:
        table.add_column(column.removeprefix("eval/"), justify="right")
    for row in rows:
        cells = (f"{row.metrics[c]:.3f}" if c in row.metrics else "" for c in columns)
        table.add_row(str(row.step), *cells)
    console.print(table)
