"""The on-disk format of a resumable training state (tinker `save_weights` / `load_weights`).

One directory, written atomically: `weights.safetensors` (trainable parameters by name: the
LoRA adapter, or every parameter of a full model), `optimizer.safetensors` (AdamW moments and
step per parameter, `"<param>::<key>"`), `state.json` (base model, step, LoRA settings, RNG
state) and the `COMPLETE` marker. safetensors rather than pickles: loading runs no code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from backend.trainer.atomic import atomic_directory, verify_complete
from backend.trainer.errors import UserError
from backend.trainer.settings import LoraSettings

FORMAT_VERSION = 1
_WEIGHTS = "weights.safetensors"
_OPTIMIZER = "optimizer.safetensors"
_META = "state.json"
_KEY_SEPARATOR = "::"

ParamState = dict[str, dict[str, torch.Tensor]]


class StateMeta(BaseModel):
    """What a checkpoint is: which model, which step, which LoRA shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    base_model: str
    step: int
    lora: LoraSettings | None
    has_optimizer: bool
    rng_state: list[int]


@dataclass(frozen=True)
class SavedState:
    meta: StateMeta
    weights: dict[str, torch.Tensor]
    optimizer: ParamState | None


def write_state(
    directory: Path,
    meta: StateMeta,
    weights: dict[str, torch.Tensor],
    optimizer: ParamState | None,
    *,
    overwrite: bool = False,
) -> None:
    """Write a complete state directory atomically (tensors must be on the CPU)."""
    with atomic_directory(directory, overwrite=overwrite) as tmp_dir:
        save_file({name: t.contiguous() for name, t in weights.items()}, tmp_dir / _WEIGHTS)
        if optimizer is not None:
            flat = {
                f"{name}{_KEY_SEPARATOR}{key}": t.contiguous()
                for name, state in optimizer.items()
                for key, t in state.items()
            }
            save_file(flat, tmp_dir / _OPTIMIZER)
        (tmp_dir / _META).write_text(meta.model_dump_json(indent=1))


def read_state(directory: Path, *, with_optimizer: bool) -> SavedState:
    """Read a state directory after verifying its completion marker."""
    verify_complete(directory)
    try:
        meta = StateMeta.model_validate(json.loads((directory / _META).read_text()))
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory} is not a fireloop training state: {exc}") from exc
    if meta.format_version != FORMAT_VERSION:
        raise UserError(f"{directory} has state format {meta.format_version}, not {FORMAT_VERSION}")
    weights = load_file(directory / _WEIGHTS)
    optimizer: ParamState | None = None
    if with_optimizer:
        if not meta.has_optimizer:
            raise UserError(f"checkpoint {directory} holds no optimizer state")
        optimizer = {}
        for flat_key, tensor in load_file(directory / _OPTIMIZER).items():
            name, key = flat_key.rsplit(_KEY_SEPARATOR, 1)
            optimizer.setdefault(name, {})[key] = tensor
    return SavedState(meta=meta, weights=weights, optimizer=optimizer)


def check_compatible(
    saved_state: SavedState, *, directory: Path, base_model: str, lora: LoraSettings | None
) -> None:
    """Refuse a state of another base model or LoRA shape, naming both sides."""
    saved = saved_state.meta
    if saved.base_model != base_model:
        raise UserError(
            f"checkpoint {directory} was trained on base model {saved.base_model!r}, "
            f"this model is {base_model!r}"
        )
    if _describe(saved.lora) != _describe(lora):
        raise UserError(
            f"checkpoint {directory} holds {_describe(saved.lora)} state, "
            f"this model is {_describe(lora)}"
        )


def check_shapes(
    saved: SavedState, *, directory: Path, trainable: Mapping[str, torch.Tensor]
) -> None:
    """Refuse weights whose names or shapes differ from the model's trainable parameters."""
    expected = {name: tuple(p.shape) for name, p in trainable.items()}
    found = {name: tuple(t.shape) for name, t in saved.weights.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise UserError(f"checkpoint {directory} weights do not fit this model: {differing}")


def _describe(lora: LoraSettings | None) -> str:
    # Everything that changes the set, shape or scale of the trainable weights; not the seed.
    if lora is None:
        return "full-parameter"
    targets = [
        name
        for name, on in (
            ("attn", lora.train_attn),
            ("mlp", lora.train_mlp),
            ("unembed", lora.train_unembed),
        )
        if on
    ]
    return f"LoRA (rank {lora.rank}, alpha {lora.alpha:g}, targets {'+'.join(targets)})"
