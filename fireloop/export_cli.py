"""`fireloop export`: find a run's checkpoint through its ledger and export it as a model directory.

The ledger names the checkpoint (the newest, or the one after a given number of steps) and the
trainer job that saved it; the platform's data directory holds its files. The export itself is
`backend.export.export_checkpoint`, which the promote route shares.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from backend.export import ExportError, ExportResult, export_checkpoint
from backend.models.registry import UnknownModelError
from backend.trainer.checkpoints import CheckpointStore
from backend.trainer.errors import UserError
from flows.ledger import LEDGER_FILENAME, CheckpointRow, LedgerError, read_ledger

__all__ = ["ExportRequest", "export_run", "find_checkpoint", "run_and_report"]

# The embedded platform of a run keeps its data here, inside the run directory.
PLATFORM_SUBDIR = "platform"


@dataclass(frozen=True)
class ExportRequest:
    """What the user asked for on the command line."""

    run_dir: Path
    out: Path
    step: int | None = None
    merged: bool = False
    force: bool = False
    data_dir: Path | None = None  # a standalone backend's data directory
    model_cache: Path | None = None


def find_checkpoint(run_dir: Path, step: int | None) -> CheckpointRow:
    """The ledger's newest resumable checkpoint row, or the one after `step` optimizer steps.

    `step` is the number of optimizer steps the checkpoint holds, as its name `step-N` says (the
    row's `next_step`). Raises `ExportError` naming the ledger and the steps it has.
    """
    ledger_file = run_dir / LEDGER_FILENAME
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    try:
        rows = read_ledger(run_dir)
    except LedgerError as exc:
        raise ExportError(f"{ledger_file} cannot be read: {exc}") from exc
    if not rows:
        raise ExportError(f"{run_dir} is not a run directory: it has no {LEDGER_FILENAME}")
    checkpoints = [row for row in rows if isinstance(row, CheckpointRow) and row.resumable]
    if not checkpoints:
        raise ExportError(f"{ledger_file} records no checkpoint yet: nothing to export")
    if step is None:
        return checkpoints[-1]
    matching = [row for row in checkpoints if row.next_step == step]
    if not matching:
        steps = ", ".join(str(n) for n in sorted({row.next_step for row in checkpoints}))
        raise ExportError(f"{ledger_file} has no checkpoint at step {step}; it has steps {steps}")
    return matching[-1]  # a resumed run may save the same step again: the later one counts


def checkpoint_dir(row: CheckpointRow, data_dir: Path) -> Path:
    """Where the platform whose data directory is `data_dir` keeps the row's resumable state."""
    if row.job_id is None:
        raise ExportError(f"ledger checkpoint {row.name!r} names no trainer job")
    try:
        return CheckpointStore(data_dir).resolve(row.state_path, job_id=row.job_id).path
    except UserError as exc:
        raise ExportError(f"ledger checkpoint {row.name!r}: {exc}") from exc


def base_model_dir(base_model: str, model_cache: Path | None) -> Path:
    """The base model's directory in the shared model cache (built there if it is missing)."""
    from backend.models.store import ensure_model_dir, resolve_models_dir

    try:
        return ensure_model_dir(base_model, resolve_models_dir(model_cache))
    except UnknownModelError as exc:
        raise ExportError(f"the run's base model is not a local model: {exc}") from exc


def export_run(request: ExportRequest) -> ExportResult:
    """Export the requested checkpoint of `request.run_dir` into `request.out`."""
    row = find_checkpoint(request.run_dir, request.step)
    data_dir = request.data_dir or request.run_dir / PLATFORM_SUBDIR
    source = checkpoint_dir(row, data_dir)
    if not source.is_dir():
        raise ExportError(
            f"checkpoint {row.name!r} (step {row.next_step}) of job {row.job_id} is gone: "
            f"{source} does not exist"
            + ("" if request.data_dir else "; for a standalone backend pass --data-dir")
        )
    return export_checkpoint(
        source,
        base_model_dir(row.base_model, request.model_cache),
        request.out,
        merged=request.merged,
        force=request.force,
    )


def run_and_report(request: ExportRequest, console: Console) -> int:
    """Export and print what was written and how to load it; the exit code."""
    started = time.monotonic()
    try:
        result = export_run(request)
    except UserError as exc:  # ExportError and the store's own user errors
        console.print(f"[red]export failed[/]: {escape(str(exc))}", soft_wrap=True)
        return 2  # a user error, as for `fireloop run`
    seconds = time.monotonic() - started
    what = {
        "full": "Hugging Face model directory",
        "merged": "Hugging Face model directory (LoRA merged into the base)",
        "lora": "PEFT adapter directory",
    }[result.kind]
    step = "" if result.step is None else f" at step {result.step}"
    console.print(
        f"exported {escape(result.base_model)}{step} as a {what} to "
        f"{escape(str(result.out_dir))} in {seconds:.1f} s",
        soft_wrap=True,  # whole paths: people copy them
    )
    console.print(f"files: {', '.join(result.files)}", soft_wrap=True)
    out = escape(str(result.out_dir))
    if result.kind == "lora":
        base = escape(str(result.base_model_dir))
        console.print(
            f"load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), "
            f"'{out}')",
            soft_wrap=True,
        )
    else:
        console.print(f"load: AutoModelForCausalLM.from_pretrained('{out}')", soft_wrap=True)
    return 0
