# ruff: noqa: N815  (shape-suffixed tensor names: tokens_BT, the house style)
"""Micro-batches for forward passes: group datums by length, right-pad, gather target logprobs.

Datums are sorted by length (longest first) and packed greedily under a padded-token budget,
so one request of many short sequences runs as a few dense batches instead of N tiny passes,
and memory stays bounded for long ones. Right padding leaves every real position's logits
unchanged (a causal model never attends forward), so a datum's logprobs equal a per-datum
pass up to fp32 rounding. The packing depends only on the lengths: same input, same order of
floating-point operations, bitwise-identical results on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from backend.trainer.datum import Datum


def pack(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Datum indices grouped so each group's `len(group) * longest` stays within the budget.

    A single datum longer than the budget still forms its own group.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        # Sorted longest first: the group's first member sets its padded length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@dataclass(frozen=True)
class PaddedBatch:
    """Datums right-padded to the longest: token ids, targets, and the attention mask to pass
    (None when nothing is padded, so the model takes its plain causal path)."""

    tokens_BT: torch.Tensor
    targets_BT: torch.Tensor
    attention_mask: torch.Tensor | None
    lengths: list[int]


def pad(datums: Sequence[Datum], device: torch.device) -> PaddedBatch:
    """`datums` as one right-padded batch on `device`."""
    lengths = [d.num_tokens for d in datums]
    T = max(lengths)
    tokens_BT = torch.zeros(len(datums), T, dtype=torch.int64)
    targets_BT = torch.zeros(len(datums), T, dtype=torch.int64)
    mask_BT = torch.zeros(len(datums), T, dtype=torch.int64)
    for b, datum in enumerate(datums):
        n = lengths[b]
        tokens_BT[b, :n] = torch.tensor(datum.tokens, dtype=torch.int64)
        targets_BT[b, :n] = datum.loss_fn_inputs["target_tokens"]
        mask_BT[b, :n] = 1
    attention_mask = None if min(lengths) == T else mask_BT.to(device)
    return PaddedBatch(tokens_BT.to(device), targets_BT.to(device), attention_mask, lengths)


def target_logprobs(
    model: torch.nn.Module,
    batch: PaddedBatch,
    autocast: AbstractContextManager[object] | None = None,
) -> torch.Tensor:
    """fp32 log p(target_t | tokens_≤t), (B, T) (padding positions hold junk), differentiable
    if grad is on; one full log-softmax over BxTxV. `autocast` wraps the model's forward."""
    with autocast or nullcontext():
        logits_BTV = model(input_ids=batch.tokens_BT, attention_mask=batch.attention_mask).logits
    # Always fp32: bf16 logprobs are too coarse for importance ratios.
    logprobs_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return logprobs_BTV.gather(-1, batch.targets_BT.unsqueeze(-1)).squeeze(-1)
