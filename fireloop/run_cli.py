"""`fireloop run <recipe>` and `fireloop demo`: a recipe's flow from the terminal.

The run reports to a Prefect server the CLI starts out of the terminal's signal path (or to
PREFECT_API_URL), shows its notices above a live progress bar, prints a known user error as its
message (exit 2), stops within seconds on Ctrl-C or SIGTERM (exit 130 / 143) saying how to
resume, and ends with a summary of what exists afterwards and where it lives.
"""

from __future__ import annotations

import os
import shlex
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fireloop.interrupts import interrupt_exit_code, sigterm_raises
from fireloop.overrides import apply_overrides, load_config_file
from fireloop.prefect_server import PrefectApi, PrefectServerError, prefect_api
from fireloop.quiet import configure_output, printing_notices
from fireloop.recipes import RECIPES

if TYPE_CHECKING:
    from flows.config import RecipeConfig
    from flows.ledger import HotloadRow
    from flows.lifecycle import RunResult
    from flows.monitoring import Progress as StepProgress

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1

# Offline by default: no telemetry from Prefect, tinker or the hubs (env vars are read at import).
_OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TINKER_TELEMETRY": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars
}


def set_offline_defaults() -> None:
    for key, value in _OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def build_config(config_file: Path | None, assignments: list[str]) -> dict[str, Any]:
    """The config mapping: the file (if any) with the `--set` assignments applied."""
    data = load_config_file(config_file) if config_file is not None else {}
    return apply_overrides(data, assignments)


@dataclass(frozen=True)
class RunRequest:
    """One `run <recipe>` as the user typed it (to tell them how to run it again) and its
    config."""

    data: dict[str, Any]
    config_file: Path | None = None
    assignments: tuple[str, ...] = ()
    verbose: bool = False
    recipe: str = "sft"  # a `RECIPES` name

    def rerun_command(self, run_name: str) -> str:
        """The `fireloop run <recipe>` command that resumes this run: the same arguments, and
        the run name spelled out when it was not given (generated, or the demo's)."""
        args = ["fireloop", "run", self.recipe]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        for assignment in self.assignments:
            key, _, _ = assignment.partition("=")
            if key.rsplit(".", 1)[-1] == "api_key":  # never print a key; the user has it
                assignment = f"{key}=<your key>"
            args += ["--set", assignment]
        if "run_name" not in self.data:
            args += ["--set", f"run_name={run_name}"]
        return shlex.join(args)


def print_error(console: Console, message: str) -> None:
    """`message` in red, as plain text: rich markup would eat brackets such as `[a-z]`."""
    console.print(Text(message, style="red"), soft_wrap=True)


def run_and_report(request: RunRequest, console: Console) -> int:
    """Validate, run the recipe's flow with a progress bar, print the summary; the exit code."""
    configure_output(verbose=request.verbose)
    return with_prefect(console, lambda api: _run(request, api, console))


def with_prefect(console: Console, body: Callable[[PrefectApi], int]) -> int:
    """`body`'s exit code, run with a Prefect API (started now, while `body` imports its flow
    modules) and SIGTERM raising; an interrupt before `body` acts on it is an exit code too."""
    set_offline_defaults()
    with sigterm_raises():
        try:
            with prefect_api() as api, flow_heartbeats(watched=api.server is None):
                return body(api)
        except PrefectServerError as exc:
            print_error(console, f"error: {exc} (or set PREFECT_API_URL to a running server)")
            return EXIT_FAILURE
        except BaseException as exc:
            code = interrupt_exit_code(exc)
            if code is None:
                raise
            console.print(Text(f"\ninterrupted before the run started (exit {code})"))
            return code


@contextmanager
def flow_heartbeats(*, watched: bool) -> Iterator[None]:
    """Flow-run heartbeats only where a Prefect server outlives this process (`watched`: the
    user's PREFECT_API_URL), at Prefect's frequency: there an automation can mark a run whose
    process died as crashed. The temporary server stops with the CLI, so nothing could ever
    read them, and a sync flow would pay up to a second joining their thread at its end."""
    if watched:
        yield
        return
    from prefect.settings import temporary_settings  # once PREFECT_API_URL is in place

    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


def _run(request: RunRequest, api: PrefectApi, console: Console) -> int:
    recipe = RECIPES[request.recipe]
    try:
        config = recipe.config_class().model_validate(request.data)
    except ValidationError as exc:
        print_error(console, f"invalid {recipe.title} config:\n{exc}")
        return EXIT_USER_ERROR
    run = recipe.entry_point()  # imports the flow while Prefect's server starts
    api.wait_ready()
    bar = StepBar(console, recipe.name, config.run_name, config.max_steps)
    with printing_notices(console):
        try:
            try:
                result = run(config, bar.on_progress)
            finally:
                bar.close()
        except BaseException as exc:
            code = interrupt_exit_code(exc)
            if code is not None:
                print_interrupted(console, request, config, code)
                return code
            if not isinstance(exc, Exception):
                raise
            return report_failure(exc, console)
    if not result.already_complete:
        print_report(result.ledger_path, console)
    print_summary(result, console, config.headline_metric)
    return 0


def report_failure(exc: Exception, console: Console) -> int:
    """A known user error as its message (exit 2); anything else with its traceback (exit 1)."""
    from flows.failures import is_user_error

    if is_user_error(exc):
        print_error(console, f"error: {exc}")
        return EXIT_USER_ERROR
    print_error(console, "".join(traceback.format_exception(exc)).rstrip())
    console.print(Text("(run with --verbose for Prefect's log of the run)"))
    return EXIT_FAILURE


class StepBar:
    """The live progress bar, started at the first finished step (a run that has nothing left
    to do shows none)."""

    def __init__(self, console: Console, recipe: str, run_name: str, total_steps: int) -> None:
        self.console, self.recipe = console, recipe
        self.run_name, self.total_steps = run_name, total_steps
        self._progress: Progress | None = None

    def on_progress(self, step: StepProgress) -> None:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.fields[recipe]} {task.fields[run]}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}", markup=False),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.start()
            self._progress.add_task(
                "train", total=self.total_steps, recipe=self.recipe, run=self.run_name, metrics=""
            )
        # The recipe's headline metric (SFT: train/ce_loss, DPO: train/dpo_loss) and the LR.
        keys = (step.headline_metric, "train/lr")
        shown = {k: step.metrics[k] for k in keys if k in step.metrics}
        text = "  ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in shown.items())
        self._progress.update(self._progress.task_ids[0], completed=step.step + 1, metrics=text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def print_interrupted(
    console: Console, request: RunRequest, config: RecipeConfig, code: int
) -> None:
    """What a stopped run left, and the command that resumes it."""
    from flows.ledger import CheckpointRow, read_ledger

    what = "Ctrl-C" if code == 130 else "SIGTERM"
    checkpoints = [
        row for row in read_ledger(config.resolved_run_dir) if isinstance(row, CheckpointRow)
    ]
    if checkpoints:
        last = checkpoints[-1]
        kept = f"it resumes after step {last.next_step} (checkpoint {last.name})"
    else:
        kept = "no checkpoint was saved yet: it starts again from step 0"
    console.print(
        Text(f"\nstopped by {what}: run {config.run_name} was not finished; {kept}."),
        soft_wrap=True,
    )
    console.print(Text("to resume, run:", style="bold"))
    console.print(Text(f"  {request.rerun_command(config.run_name)}"), soft_wrap=True)


def print_summary(result: RunResult, console: Console, headline_metric: str) -> None:
    """Where the run ended (its headline metric and last evaluation), what exists after it and
    where: files first, then the platform's resources (the flow's own notice has already said
    how the run ended)."""
    rows: Sequence[tuple[str, str | None]] = (
        ("final", _final_metrics(result, headline_metric)),
        ("checkpoints", result.checkpoint_dir),
        ("ledger", result.ledger_path),
        ("metrics", result.metrics_path),
        ("W&B files", result.wandb_dir),
        ("export", _export_command(result)),
    )
    for label, value in rows:
        if value is not None:  # whole, never folded or cut: people copy these
            console.print(Text(f"  {label:<12} {value}"), soft_wrap=True)
    console.print(Text(_resources_line(result)), soft_wrap=True)


# The evaluation scores a person looks at first (SFT's toy tasks, RL, the preference recipes).
_SCORES: Final = ("eval/exact_match", "eval/reward", "eval/accuracy")


def _final_metrics(result: RunResult, headline_metric: str) -> str | None:
    """`dpo_loss 0.412  eval/dpo_loss 0.5  eval/accuracy 0.938 (after 20 steps)`: the last
    step's headline metric (absent when nothing was trained now), then the last evaluation's
    value of it and its score."""
    name = headline_metric.removeprefix("train/")
    keys = (headline_metric, f"eval/{name}", *_SCORES)
    shown = [(key, result.final_metrics[key]) for key in keys if key in result.final_metrics]
    if not shown:
        return None
    text = "  ".join(f"{key.removeprefix('train/')} {value:.4g}" for key, value in shown)
    return f"{text} (after {result.steps_done} steps)"


def _export_command(result: RunResult) -> str:
    command = f"fireloop export {shlex.quote(result.run_dir)} --out <dir>"
    if result.platform == "embedded":
        return command
    # The checkpoints are the platform's: a standalone backend's data dir holds them, and the
    # Fireworks platform keeps them remote (promotion makes a model of one there).
    return f"{command} --data-dir <backend data dir> (fireloop backend; on Fireworks: promote)"


_FATES = {
    "kept": "kept (still running on the platform)",
    "scaled_to_zero": "scaled to zero",
    "deleted": "deleted",
    "not_owned": "left as it was (not this run's)",
}


def _resources_line(result: RunResult) -> str:
    if result.platform == "embedded":
        return (
            "the embedded platform stopped with this process, and its trainer and deployment "
            f"with it; the checkpoints stay on disk: export them, or train run {result.run_name} "
            "further with a larger max_steps and extend=true"
        )
    line = f"trainer job {result.trainer_job_id}: {_FATES[result.trainer_after]}"
    if result.deployment_id is not None and result.deployment_after is not None:
        line += f"; deployment {result.deployment_id}: {_FATES[result.deployment_after]}"
    return line


# Counts that say how big the eval set was, not how the model did: the table leaves them out.
_EVAL_COUNTS = frozenset({"eval/tokens", "eval/batch_pairs"})


def _shown_eval_metrics(names: set[str]) -> list[str]:
    """The evaluation columns worth a terminal's width: no counts, and `eval/loss` only when it
    is not an alias of the recipe's own loss (`eval/dpo_loss`, `eval/orpo_loss`)."""
    shown = names - _EVAL_COUNTS
    if any(name.endswith("_loss") and name != "eval/loss" for name in shown):
        shown.discard("eval/loss")
    return sorted(shown)


def print_report(ledger_path: str, console: Console) -> None:
    """Evaluations and hotloads of the run, as its ledger recorded them."""
    from flows.ledger import EvaluationRow, HotloadRow, read_ledger

    rows = read_ledger(str(Path(ledger_path).parent))
    names = _shown_eval_metrics(
        {k for r in rows if isinstance(r, EvaluationRow) for k in r.metrics}
    )
    if names:
        evals = Table(title="evaluation (weights before the step)")
        evals.add_column("step", justify="right")
        for name in names:
            evals.add_column(name.removeprefix("eval/"), justify="right")
        for row in rows:
            if isinstance(row, EvaluationRow):
                evals.add_row(
                    str(row.step), *(f"{row.metrics.get(n, float('nan')):.4g}" for n in names)
                )
        console.print(evals)
    hotload_rows = [row for row in rows if isinstance(row, HotloadRow)]
    if hotload_rows:
        hotloads = Table(title="hotloads")
        for column in ("step", "identity", "type", "verified"):
            hotloads.add_column(column)
        for hotload in _ends(hotload_rows):
            if hotload is None:
                hidden = hotload_rows[_HOTLOADS_SHOWN:-_HOTLOADS_SHOWN]
                unverified = sum(not row.verified for row in hidden)
                verified = "all yes" if not unverified else f"{unverified} NO"
                hotloads.add_row("…", f"{len(hidden)} more", "", verified)
                continue
            hotloads.add_row(
                str(hotload.step),
                Text(hotload.identity),
                str(hotload.checkpoint_type),
                "yes" if hotload.verified else "NO",
            )
        console.print(hotloads)


# RL hotloads after every window: a long run lists its first and last few (the ledger has all).
_HOTLOADS_SHOWN: Final = 4


def _ends(rows: Sequence[HotloadRow]) -> list[HotloadRow | None]:
    """`rows`, or their first and last `_HOTLOADS_SHOWN` with None between them."""
    if len(rows) <= 2 * _HOTLOADS_SHOWN + 1:
        return list(rows)
    return [*rows[:_HOTLOADS_SHOWN], None, *rows[-_HOTLOADS_SHOWN:]]
