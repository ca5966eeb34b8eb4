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


def target_logprobs(
    model: torch.nn.Module, datums: Sequence[Datum], device: torch.device
) -> list[torch.Tensor]:
    """fp32 log p(target_t | tokens_≤t) per datum, each (N,), differentiable if grad is on."""
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
    # Without padding, let the model take its plain causal path.
    attention_mask = None if min(lengths) == T else mask_BT.to(device)
    with _autocast(device):
        logits_BTV = model(input_ids=tokens_BT.to(device), attention_mask=attention_mask).logits
    # Always fp32: bf16 logprobs are too coarse for importance ratios.
    logprobs_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    target_lp_BT = logprobs_BTV.gather(-1, targets_BT.to(device).unsqueeze(-1)).squeeze(-1)
    return [target_lp_BT[b, :n] for b, n in enumerate(lengths)]


def _autocast(device: torch.device) -> AbstractContextManager[object]:
    # fp32 master weights; bf16 matmuls on GPU, plain fp32 on CPU (bf16 is slow there).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
