"""`fireloop run sft` and `fireloop demo`: the SFT flow from the terminal, with a progress bar
and a report read back from the run's ledger (evaluations and verified hotloads).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fireloop.overrides import apply_overrides, load_config_file

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


def run_and_report(data: dict[str, Any], console: Console) -> int:
    """Validate, run the SFT flow with a progress bar, print the report; the exit code."""
    set_offline_defaults()
    from flows.sft import Progress as StepProgress
    from flows.sft import SFTConfig, run_sft

    try:
        config = SFTConfig.model_validate(data)
    except ValidationError as exc:
        console.print(f"[red]invalid SFT config[/]:\n{exc}")
        return 2
    columns = (
        TextColumn("[bold]sft[/] {task.fields[run]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=config.max_steps, run=config.run_name, metrics="")

        def on_progress(step: StepProgress) -> None:
            shown = {k: v for k, v in step.metrics.items() if k in _SHOWN_METRICS}
            text = "  ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in shown.items())
            bar.update(task, completed=step.step + 1, metrics=text)

        result = run_sft(config, on_progress=on_progress)
    print_report(result.ledger_path, console)
    console.print(
        f"steps {result.steps_done}, last checkpoint {result.last_checkpoint}, "
        f"serving {result.served_snapshot} on {result.deployment_id}; ledger {result.ledger_path}"
    )
    return 0


_SHOWN_METRICS = ("train/ce_loss", "train/lr", "eval/exact_match")


def print_report(ledger_path: str, console: Console) -> None:
    """Evaluations and hotloads of the run, as its ledger recorded them."""
    from flows.ledger import EvaluationRow, HotloadRow, read_ledger

    rows = read_ledger(str(Path(ledger_path).parent))
    evals = Table(title="evaluation (weights before the step)")
    evals.add_column("step", justify="right")
    names = sorted({k for r in rows if isinstance(r, EvaluationRow) for k in r.metrics})
    for name in names:
        evals.add_column(name, justify="right")
    for row in rows:
        if isinstance(row, EvaluationRow):
            evals.add_row(
                str(row.step), *(f"{row.metrics.get(n, float('nan')):.3f}" for n in names)
            )
    hotloads = Table(title="hotloads")
    for column in ("step", "identity", "type", "verified"):
        hotloads.add_column(column)
    for row in rows:
        if isinstance(row, HotloadRow):
            hotloads.add_row(
                str(row.step),
                row.identity,
                str(row.checkpoint_type),
                "yes" if row.verified else "NO",
            )
    console.print(evals)
    console.print(hotloads)
