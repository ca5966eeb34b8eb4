"""Turning a base model and sampler snapshots into a model ready to decode.

Every served model is built the trainer's way (`modeling.load_hf_model`: fp32 weights, the same
attention implementation), so served logprobs match the trainer's `forward` at equal weights.
Every snapshot is written into a standby model that no request uses (building a model costs
more than its weights' copy): a full snapshot replaces every weight; a delta is XORed against
the weights being served, in the snapshot's dtype, and its Adler-32 checksums prove it was
applied to the right base (`export.apply_delta_tensors`); a LoRA snapshot is a PEFT adapter
merged, in place, into the base model's own weights (`W = base + scale * B @ A` for the adapted
layers, restored from the base safetensors files first), so serving costs nothing extra per
token. Imports torch: the runtime loads this module on its loader thread only.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedModel

from backend.models.loading import model_construction
from backend.serving import adapter_merge
from backend.serving.generation import DecodingModel
from backend.trainer import export, modeling
from backend.trainer.errors import UserError

logger = logging.getLogger(__name__)

SnapshotKind = Literal["full", "delta", "adapter"]


@dataclass(frozen=True)
class SnapshotInfo:
    """What `snapshot.json` says about a sampler snapshot, as the hotload path needs it."""

    identity: str
    kind: SnapshotKind
    checkpoint_type: str  # base, delta or merged_base, as the trainer saved it
    base_model: str
    previous_identity: str | None  # a delta's recorded base
    dtype: str
    meta: dict[str, Any]  # the whole `snapshot.json` (a delta's checksums)


def read_snapshot_info(directory: Path, *, verify: bool = True) -> SnapshotInfo:
    """The snapshot's metadata; `UserError` when it is incomplete or not a snapshot.
    `verify=False`: see `export.read_snapshot_meta`."""
    meta = export.read_snapshot_meta(directory, verify=verify)
    checkpoint_type = str(meta.get("checkpoint_type", ""))
    kind: SnapshotKind
    if meta.get("format") == "peft_adapter":
        kind = "adapter"
    elif checkpoint_type == "delta":
        kind = "delta"
    else:
        kind = "full"
    previous = meta.get("previous_snapshot_identity")
    return SnapshotInfo(
        identity=str(meta.get("identity", directory.name)),
        kind=kind,
        checkpoint_type=checkpoint_type,
        base_model=str(meta.get("base_model", "")),
        previous_identity=str(previous) if previous is not None else None,
        dtype=str(meta.get("dtype", "float32")),
        meta=meta,
    )


class ModelFactory:
    """Builds `DecodingModel`s of one base model directory (the tokenizer is loaded once)."""

    def __init__(self, model_dir: Path, device: torch.device, context_length: int) -> None:
        self.model_dir = model_dir
        self.device = device
        self.context_length = context_length
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        # Per model built here: the weights (state-dict keys) that may differ from the base
        # model's own, or None when any may (a full or delta load, or one that failed half-way).
        # An adapter load then restores only those, not the whole model.
        self._off_base: weakref.WeakKeyDictionary[torch.nn.Module, frozenset[str] | None] = (
            weakref.WeakKeyDictionary()
        )

    def base(self) -> DecodingModel:
        """The base model's own weights."""
        model = self._wrap(modeling.load_hf_model(self.model_dir, self.device))
        self._off_base[model.module] = frozenset()
        return model

    def full(self, tensors: export.Tensors, where: Path, into: DecodingModel) -> DecodingModel:
        """`into`, a model no request uses, with every weight replaced by `tensors` (any float
        dtype); `UserError` when they do not fit, leaving `into` partly written."""
        self._off_base[into.module] = None
        _copy_weights(into.module, tensors, where)
        return into

    def adapter(self, adapter_dir: Path, into: DecodingModel) -> DecodingModel:
        """`into`, a model no request uses, with the base model's own weights and the LoRA
        adapter of `adapter_dir` merged into them, in place (`into` keeps its modules and
        weight tensors). A plain LoRA adapter is merged by `adapter_merge` after restoring only
        the weights that may differ from the base; any other PEFT adapter by PEFT, after
        restoring every weight. A failure may leave LoRA layers in `into` (the PEFT path),
        which then fits no other load."""
        plan = adapter_merge.plan_merge(adapter_dir)
        off_base = self._off_base.get(into.module)
        self._off_base[into.module] = None  # until the merge is complete
        if plan is None:
            self._peft_merge(adapter_dir, into)
            return into
        targets = _unique_weights(into.module)
        adapter_merge.check_fits(plan, targets, adapter_dir)
        # The previous adapter's layers and this one's go back to the base weights; a model
        # whose other weights may be off the base (a full snapshot) is restored whole.
        restore = None if off_base is None else off_base | plan.weight_names
        _restore_base(into.module, self.model_dir, only=restore)
        adapter_merge.merge(plan, targets)
        self._off_base[into.module] = plan.weight_names
        return into

    def _peft_merge(self, adapter_dir: Path, into: DecodingModel) -> None:
        """PEFT wraps `into`'s layers in LoRA layers, adds each one's update to its base
        layer's weight and puts the base layer back."""
        _restore_base(into.module, self.model_dir)
        # Injecting the LoRA layers is model construction too (transformers' global init state).
        with model_construction():
            peft_model = PeftModel.from_pretrained(into.module, str(adapter_dir))
        if peft_model.merge_and_unload() is not into.module:
            raise RuntimeError("PEFT merged the adapter into a new module, not in place")
        self._off_base[into.module] = None  # which weights PEFT changed is its business

    def delta(
        self, current: DecodingModel, delta_dir: Path, info: SnapshotInfo, into: DecodingModel
    ) -> DecodingModel:
        """`into` with `current`'s weights XOR the delta, checksums verified (`UserError` if
        they fail). fp32 results are XORed straight into `into`'s weights."""
        served = _served_tensors(current.module, _dtype(info.dtype))
        self._off_base[into.module] = None
        targets = _unique_weights(into.module)
        restored = export.apply_delta_tensors(served, delta_dir, info.meta, out=targets)
        return self.full(restored, delta_dir, into)

    def decode(self, tokens: Any) -> str:
        return cast(str, self._tokenizer.decode(list(tokens)))

    def token_text(self, token_id: int) -> str:
        return cast(str, self._tokenizer.decode([token_id]))

    def _wrap(self, module: PreTrainedModel) -> DecodingModel:
        # Served weights need no gradients (and PEFT's merge freezes them: models stay alike).
        cast(torch.nn.Module, module).eval().requires_grad_(False)
        config = module.generation_config
        eos = config.eos_token_id if config is not None else None
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        forward_parameters = inspect.signature(module.forward).parameters
        return DecodingModel(
            module=cast(torch.nn.Module, module),
            device=self.device,
            vocab_size=int(module.config.vocab_size),
            context_length=self.context_length,
            eos_token_ids=frozenset(int(e) for e in eos_ids),
            cache_kwarg="cache" if "cache" in forward_parameters else "past_key_values",
            decode=self.decode,
        )


def _unique_weights(module: torch.nn.Module) -> export.Tensors:
    """The module's own weight tensors keyed as the trainer exports them
    (`modeling.full_tensors`): a tied tensor once, under its first name."""
    tensors: export.Tensors = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return tensors


def _served_tensors(module: torch.nn.Module, dtype: torch.dtype) -> export.Tensors:
    """The served weights in the snapshot's dtype. Read only by the XOR, so fp32 weights are
    not copied (`to` returns the tensor itself), which saves a model-sized copy per delta."""
    return {name: t.detach().to("cpu", dtype) for name, t in _unique_weights(module).items()}


def _copy_weights(module: torch.nn.Module, tensors: export.Tensors, where: Path) -> None:
    """Copy `tensors` into the module's weights: every one must be given, with its shape (a
    tied LM head is stored once, as the embedding, and follows it)."""
    targets = _unique_weights(module)
    missing, unexpected = targets.keys() - tensors.keys(), tensors.keys() - targets.keys()
    misshapen = [n for n in targets.keys() & tensors.keys() if tensors[n].shape != targets[n].shape]
    if missing or unexpected or misshapen:
        raise UserError(
            f"snapshot {where.name!r} does not fit the base model: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, "
            f"of another shape {sorted(misshapen)[:3]}"
        )
    with torch.no_grad():
        for name, target in targets.items():
            source = tensors[name]
            if (source.data_ptr(), source.dtype) != (target.data_ptr(), target.dtype):
                target.copy_(source)


def _restore_base(
    module: torch.nn.Module, model_dir: Path, *, only: frozenset[str] | None = None
) -> None:
    """Copy the base model's own weights, from its safetensors files, into the module's weights
    one tensor at a time (no model-sized copy in memory; the files' dtype is converted as
    `modeling.load_hf_model` converts it). Every weight must be there once, with its shape.
    `only`: restore just these weights (the others already hold the base's)."""
    targets = _unique_weights(module)
    wanted = targets.keys() if only is None else only
    restored: set[str] = set()
    with torch.no_grad():
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(path, framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (a safe_open is not iterable)
                    target = targets.get(name)
                    if target is None or name in restored:
                        raise RuntimeError(f"{path}: {name} does not fit the served model")
                    if name not in wanted:
                        continue
                    tensor = weights.get_tensor(name)
                    if target.shape != tensor.shape:
                        raise RuntimeError(f"{path}: {name} does not fit the served model")
                    target.copy_(tensor)
                    restored.add(name)
    if restored != wanted:
        missing = sorted(wanted - restored)[:3]
        raise RuntimeError(f"{model_dir} holds no base weights for {missing}")


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"unknown snapshot dtype {name!r}")
    return dtypes[name]
