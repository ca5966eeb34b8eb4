"""Turn a saved checkpoint into a model directory that plain transformers or peft can load.

Resumable states hold only the trainable weights (a LoRA adapter or every parameter) in the
trainer's own format, and full-parameter sampler snapshots after the first are XOR deltas: none
of them loads outside the platform. `export_checkpoint` writes a Hugging Face model directory
(full-parameter, or a LoRA merged on request) or a PEFT adapter directory, atomically.
`fireloop export` and the promote route both call it, so the two always produce the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch

from backend.trainer import export as snapshots
from backend.trainer import modeling
from backend.trainer.errors import UserError
from backend.trainer.settings import LoraSettings
from backend.trainer.state import SavedState, check_shapes, read_state

__all__ = ["EXPORT_META", "ExportError", "ExportKind", "ExportResult", "export_checkpoint"]

ExportKind = Literal["full", "lora", "merged"]
# Written beside the model files: what was exported, from where, so a directory explains itself.
EXPORT_META = "fireloop_export.json"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Files of the base model directory a PEFT adapter directory carries so its tokenizer loads too.
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")
# Exports keep the trainer's fp32 master weights: the exported model computes what it trained.
_DTYPE = torch.float32


class ExportError(UserError):
    """The checkpoint cannot be exported as asked; the message names the file or the option."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_checkpoint` wrote."""

    out_dir: Path
    kind: ExportKind
    base_model: str
    base_model_dir: Path | None  # what a LoRA adapter applies to; None for a snapshot's export
    step: int | None
    lora: LoraSettings | None
    files: tuple[str, ...]


def export_checkpoint(
    checkpoint_dir: Path,
    base_model_dir: Path,
    out_dir: Path,
    *,
    merged: bool = False,
    force: bool = False,
) -> ExportResult:
    """Export `checkpoint_dir` into `out_dir` (temporary directory, then rename).

    `checkpoint_dir` is a resumable state (`state.json`) or a full or LoRA sampler snapshot
    (`snapshot.json`; a delta is rebuilt along its chain). `base_model_dir` is the HF directory
    of the base model it was trained from. A full-parameter checkpoint becomes an HF model
    directory; a LoRA one a PEFT adapter directory, or with `merged` an HF model directory with
    the adapter folded in. A non-empty `out_dir` is replaced only with `force`.
    """
    _check_out_dir(out_dir, force=force)
    with _atomic_out_dir(out_dir) as tmp_dir:
        result = write_export(checkpoint_dir, base_model_dir, tmp_dir, merged=merged)
    return replace(result, out_dir=out_dir)


def write_export(
    checkpoint_dir: Path, base_model_dir: Path, target_dir: Path, *, merged: bool = False
) -> ExportResult:
    """Write the export of `checkpoint_dir` into the existing, empty `target_dir`."""
    used_base: Path | None = base_model_dir.resolve()
    if (checkpoint_dir / snapshots.SNAPSHOT_META).is_file():
        kind, base_model, step, lora = _export_snapshot(checkpoint_dir, target_dir, merged)
        used_base = None  # a snapshot carries its own full weights or names its base itself
    else:
        saved = _read_checkpoint(checkpoint_dir)
        base_model, step, lora = saved.meta.base_model, saved.meta.step, saved.meta.lora
        kind = _export_state(saved, checkpoint_dir, base_model_dir, target_dir, merged)
    meta: dict[str, Any] = {
        "kind": kind,
        "base_model": base_model,
        "base_model_dir": None if used_base is None else str(used_base),
        "step": step,
        "source": str(checkpoint_dir.resolve()),
        "dtype": "float32",
    }
    if lora is not None:
        meta["lora"] = lora.model_dump()
    (target_dir / EXPORT_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    files = tuple(sorted(p.name for p in target_dir.iterdir() if p.is_file()))
    return ExportResult(target_dir, kind, base_model, used_base, step, lora, files)


def _read_checkpoint(checkpoint_dir: Path) -> SavedState:
    if not checkpoint_dir.is_dir():
        raise ExportError(f"checkpoint {checkpoint_dir} does not exist (its files are gone)")
    try:
        return read_state(checkpoint_dir, with_optimizer=False)
    except UserError as exc:  # incomplete, corrupt, or not a training state: say which file
        raise ExportError(str(exc)) from exc


def _export_state(
    saved: SavedState, checkpoint_dir: Path, base_model_dir: Path, target_dir: Path, merged: bool
) -> ExportKind:
    lora = saved.meta.lora
    if merged and lora is None:
        raise ExportError(
            f"checkpoint {checkpoint_dir} is full-parameter: it already exports as a full "
            "model; --merged is only for LoRA checkpoints"
        )
    hf_model = modeling.load_hf_model(base_model_dir, torch.device("cpu"))
    model = modeling.attach_lora(hf_model, lora) if lora is not None else hf_model
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    try:
        check_shapes(saved, directory=checkpoint_dir, trainable=trainable)
    except UserError as exc:
        raise ExportError(f"{exc} (is {base_model_dir} its base model?)") from exc
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(saved.weights[name])
    if lora is not None and not merged:
        modeling.save_adapter(model, target_dir)
        _copy_tokenizer_files(base_model_dir, target_dir)
        return "lora"
    tensors = modeling.full_tensors(model, _DTYPE, merge_lora=lora is not None)
    config_json = modeling.config_json(hf_model, _DTYPE)
    snapshots.write_full_weights(target_dir, tensors, config_json, base_model_dir)
    return "merged" if lora is not None else "full"


def _export_snapshot(
    snapshot_dir: Path, target_dir: Path, merged: bool
) -> tuple[ExportKind, str, int | None, LoraSettings | None]:
    """A sampler snapshot: full weights (a delta rebuilt first) or a PEFT adapter, copied."""
    meta = snapshots.read_snapshot_meta(snapshot_dir)
    base_model, step = str(meta.get("base_model", "")), meta.get("step")
    if meta.get("format") == "peft_adapter":
        if merged:
            raise ExportError(f"snapshot {snapshot_dir} is a LoRA adapter: export its state")
        for name in _ADAPTER_FILES:
            shutil.copyfile(snapshot_dir / name, target_dir / name)
        _copy_tokenizer_files(snapshot_dir, target_dir)
        return "lora", base_model, step, None
    tensors = snapshots.load_snapshot_tensors(snapshot_dir)
    config_json = (snapshot_dir / "config.json").read_text()
    snapshots.write_full_weights(target_dir, tensors, config_json, snapshot_dir)
    kind: ExportKind = "merged" if meta.get("checkpoint_type") == "merged_base" else "full"
    return kind, base_model, step, None


def _copy_tokenizer_files(source_dir: Path, target_dir: Path) -> None:
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.name.startswith(_TOKENIZER_PREFIXES):
            shutil.copyfile(path, target_dir / path.name)


def _check_out_dir(out_dir: Path, *, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"--out {out_dir} is not empty; pass --force to replace it")


@contextmanager
def _atomic_out_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir`, renamed over it once written (removed on error)."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        _sync_files(tmp_dir)
        old_dir = None
        if out_dir.exists():
            # rename cannot replace a non-empty directory: set the old one aside first.
            old_dir = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old_dir)
        tmp_dir.rename(out_dir)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _sync_files(directory: Path) -> None:
    # Durable before the rename publishes them: a crash never leaves a truncated model file.
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as file:
                os.fsync(file.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adapter_target_modules(export_dir: Path) -> list[str]:
    """The module names a PEFT adapter directory adapts (for a promoted model's details)."""
    config = json.loads((export_dir / "adapter_config.json").read_text())
    targets = config.get("target_modules") or []
    return sorted(cast(list[str], targets))
