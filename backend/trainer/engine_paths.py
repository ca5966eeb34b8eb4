"""The trainer's compute paths: `EngineSettings` resolved for one device into an `EnginePlan`.

The plan says how a step runs (autocast dtype, AdamW kernel, torch.compile, chunked
log-softmax, batched losses); the engine asks it for each piece. Every option keeps the
math: the fp32 options match the reference path to float rounding, bf16 autocast within the
tolerance its tests state. Options a device cannot run are refused with a `UserError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch.utils.checkpoint import checkpoint

from backend.trainer.datum import Datum
from backend.trainer.errors import UserError
from backend.trainer.losses import LossFn, LossOutput
from backend.trainer.settings import AUTO_CUDA_LOGPROB_CHUNK, EngineSettings

OptimizerKernel = Literal["fused", "foreach", "single_tensor"]
# Architectures whose logits are exactly `lm_head(last_hidden_state)` (no soft-capping or
# scaling after the head), so the chunked path may apply the head itself.
CHUNKABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class EnginePlan:
    """Concrete choices for one device; `EnginePlan()` is the reference fp32 path."""

    autocast_dtype: torch.dtype | None = None
    optimizer: OptimizerKernel = "single_tensor"
    compile: bool = False
    logprob_chunk: int = 0
    batched_losses: bool = False

    def autocast(self, device: torch.device) -> AbstractContextManager[object]:
        """Autocast for the forward pass; parameters stay fp32 (they are the masters)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def new_adamw(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.AdamW:
        """AdamW over `params` with this plan's kernel; lr is set by every optim_step."""
        return torch.optim.AdamW(
            params,
            lr=0.0,
            fused=self.optimizer == "fused",
            foreach=self.optimizer == "foreach",
        )

    def describe(self) -> str:
        dtype = "fp32" if self.autocast_dtype is None else "bf16 autocast"
        chunk = f"chunk {self.logprob_chunk}" if self.logprob_chunk else "full log-softmax"
        losses = "batched losses" if self.batched_losses else "per-datum losses"
        compiled = ", compiled" if self.compile else ""
        return f"{dtype}, {self.optimizer} AdamW, {chunk}, {losses}{compiled}"


def resolve_engine(settings: EngineSettings, device: torch.device, model_type: str) -> EnginePlan:
    """The plan for `settings` on `device`; `UserError` for what this device or model can't do."""
    cuda = device.type == "cuda"
    autocast = settings.autocast if settings.autocast != "auto" else ("bf16" if cuda else "off")
    optimizer = settings.optimizer
    if optimizer == "auto":
        optimizer = "fused" if cuda else "single_tensor"
    if optimizer == "fused" and device.type not in _fused_devices():
        raise UserError(f"engine.optimizer 'fused' is not supported on {device.type}; use foreach")
    if settings.compile and not cuda:
        # Inductor on CPU needs a C++ toolchain and compiles for minutes per new shape.
        raise UserError(f"engine.compile needs a CUDA device; this trainer runs on {device.type}")
    chunk = settings.logprob_chunk
    if chunk == "auto":
        chunk = AUTO_CUDA_LOGPROB_CHUNK if cuda else 0
    if chunk and model_type not in CHUNKABLE_MODEL_TYPES:
        known = ", ".join(CHUNKABLE_MODEL_TYPES)
        raise UserError(
            f"engine.logprob_chunk: model type {model_type!r} is not known to compute logits "
            f"as lm_head(hidden states); chunking supports {known} (set logprob_chunk=0)"
        )
    batched = settings.batched_losses
    return EnginePlan(
        autocast_dtype=torch.bfloat16 if autocast == "bf16" else None,
        optimizer=optimizer,
        compile=settings.compile,
        logprob_chunk=chunk,
        batched_losses=cuda if batched == "auto" else batched,
    )


def _fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


def chunked_target_logprobs(
    decoder: torch.nn.Module,
    head: torch.nn.Module,
    tokens_BT: torch.Tensor,
    targets_BT: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    chunk: int,
    autocast: Callable[[], AbstractContextManager[object]],
    max_chunk_logits: int | None = None,
) -> torch.Tensor:
    """fp32 target logprobs (B, T) with the vocabulary log-softmax taken `chunk` positions at a
    time: lp = logit[target] - logsumexp(logits). With grad on, each chunk's logits are
    recomputed in backward (activation checkpointing), so at most one BxchunkxV fp32 block is
    alive at once, forward or backward; gradients are those of the full pass. A chunk holds at
    most `max_chunk_logits` logits (fewer positions for a wide batch), at least one position."""
    with autocast():
        hidden_BTD = decoder(input_ids=tokens_BT, attention_mask=attention_mask).last_hidden_state
    if max_chunk_logits is not None:
        B, V = tokens_BT.shape[0], int(cast(torch.Tensor, head.weight).shape[0])
        chunk = max(1, min(chunk, max_chunk_logits // (B * V)))
    pieces = []
    for start in range(0, hidden_BTD.shape[1], chunk):
        hidden_BCD = hidden_BTD[:, start : start + chunk]
        targets_BC = targets_BT[:, start : start + chunk]
        if torch.is_grad_enabled():
            lp_BC = checkpoint(
                _chunk_logprobs, head, hidden_BCD, targets_BC, autocast, use_reentrant=False
            )
        else:
            lp_BC = _chunk_logprobs(head, hidden_BCD, targets_BC, autocast)
        pieces.append(lp_BC)
    return torch.cat(pieces, dim=1)


def _chunk_logprobs(
    head: torch.nn.Module,
    hidden_BCD: torch.Tensor,
    targets_BC: torch.Tensor,
    autocast: Callable[[], AbstractContextManager[object]],
) -> torch.Tensor:
    with autocast():
        logits_BCV: torch.Tensor = head(hidden_BCD)
    # Always fp32: bf16 logprobs are too coarse for importance ratios.
    logits_BCV = logits_BCV.float()
    target_BC = logits_BCV.gather(-1, targets_BC.unsqueeze(-1)).squeeze(-1)
    return target_BC - torch.logsumexp(logits_BCV, dim=-1)


def batched_losses(
    loss: LossFn[Any],
    config: Any,
    lp_BT: torch.Tensor,
    datums: Sequence[Datum],
    device: torch.device,
) -> list[tuple[torch.Tensor, LossOutput]]:
    """Per datum (input order): its logprobs and loss, the loss computed in one call per set of
    input keys over the right-padded batch. Each datum's loss is a slice of the batch loss, so
    padding positions take no part in the summed loss or its gradient, and per-datum metrics
    are the rows of the loss's row-wise masked means (padding carries zero weight/advantage).
    """
    groups: dict[frozenset[str], list[int]] = {}
    for index, datum in enumerate(datums):
        groups.setdefault(frozenset(datum.loss_fn_inputs), []).append(index)
    results: dict[int, tuple[torch.Tensor, LossOutput]] = {}
    T = lp_BT.shape[1]
    for keys, rows in groups.items():
        group_lp_BT = lp_BT if len(rows) == len(datums) else lp_BT[rows]
        inputs = {key: _padded([datums[i] for i in rows], key, T).to(device) for key in keys}
        output = loss(group_lp_BT, inputs, config)
        for row, index in enumerate(rows):
            n = datums[index].num_tokens
            metrics = {key: value[row] for key, value in output.metrics.items()}
            results[index] = (group_lp_BT[row, :n], LossOutput(output.loss_N[row, :n], metrics))
    return [results[i] for i in range(len(datums))]


def _padded(datums: Sequence[Datum], key: str, T: int) -> torch.Tensor:
    first = datums[0].loss_fn_inputs[key]
    padded_BT = torch.zeros(len(datums), T, dtype=first.dtype)
    for b, datum in enumerate(datums):
        values_N = datum.loss_fn_inputs[key]
        padded_BT[b, : values_N.shape[0]] = values_N
    return padded_BT
