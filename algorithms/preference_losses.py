"""DPO and ORPO losses as client closures for `forward_backward_custom`, and their eval metrics.

tinker 0.23 calls `loss_fn(data, logprobs)` with one per-target log-probability tensor per datum
(datums ordered `[c0, r0, c1, r1, ...]`), backpropagates the returned scalar to those tensors and
trains on the gradients. Both losses are already means over pairs, so the optimizer step that
follows takes no normalisation. A side's response starts at target k = max(0, response_start - 1),
the first target that predicts a token where chosen and rejected differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import torch
from tinker import types
from torch.nn.functional import logsigmoid

from algorithms.preference import response_index

PreferenceLossFn = Callable[
    [list[types.Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]
]
PairReduction = Literal["mean", "sum"]

# The ORPO log-odds are finite only for an average log-probability strictly below 0; 1e-6 below
# it keeps the odds near 1e6, and -50 keeps e^a representable and away from 0.
ORPO_MIN_AVG_LOGPROB: Final = -50.0
ORPO_MAX_AVG_LOGPROB: Final = -1e-6
_LN_HALF: Final = -math.log(2.0)


def response_slices(
    logprobs: Sequence[torch.Tensor], response_starts: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, the (chosen, rejected) target log-probabilities from k on, in float64.

    `logprobs` holds one tensor per datum, ordered `[c0, r0, c1, r1, ...]`; a side with no
    target from k on is refused (its loss would be empty or NaN).
    """
    if len(logprobs) != 2 * len(response_starts):
        raise ValueError(
            f"{len(logprobs)} log-probability tensors for {len(response_starts)} pairs "
            "(need two per pair, ordered chosen, rejected)"
        )
    slices: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pair, start in enumerate(response_starts):
        k = response_index(start)
        chosen, rejected = (lp.reshape(-1)[k:].to(torch.float64) for lp in logprobs[2 * pair :][:2])
        if chosen.numel() == 0 or rejected.numel() == 0:
            raise ValueError(f"pair {pair}: a side has no target at or after k={k}")
        slices.append((chosen, rejected))
    return slices


def response_logprob_sums(
    logprobs: Sequence[torch.Tensor], response_starts: Sequence[int]
) -> list[tuple[float, float]]:
    """Per pair, (Σ_{t ≥ k} lp_t(chosen), Σ_{t ≥ k} lp_t(rejected)): the reference's DPO inputs.

    The same slices the DPO loss sums, so the policy and reference terms cancel exactly when
    the two models agree.
    """
    return [
        (float(c.sum().item()), float(r.sum().item()))
        for c, r in response_slices(logprobs, response_starts)
    ]


def logprobs_of(outputs: Sequence[Mapping[str, types.TensorData]]) -> list[torch.Tensor]:
    """The per-datum `logprobs` tensors of a forward pass's `loss_fn_outputs`."""
    return [output["logprobs"].to_torch().reshape(-1) for output in outputs]


# -- DPO ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOTerms:
    """Per-pair DPO quantities, each of shape (P,): losses, raw margins, β-scaled rewards."""

    loss: torch.Tensor
    margin: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor


def dpo_terms(
    beta: float,
    chosen_P: torch.Tensor,
    rejected_P: torch.Tensor,
    ref_chosen_P: torch.Tensor,
    ref_rejected_P: torch.Tensor,
) -> DPOTerms:
    """margin = (logπ(c) - ref_c) - (logπ(r) - ref_r);  loss = -log sigmoid(β · margin).

    `logsigmoid` keeps the loss and its gradient finite for margins of any size.
    """
    chosen_delta_P = chosen_P - ref_chosen_P
    rejected_delta_P = rejected_P - ref_rejected_P
    margin_P = chosen_delta_P - rejected_delta_P
    return DPOTerms(
        loss=-logsigmoid(beta * margin_P),
        margin=margin_P,
        chosen_reward=beta * chosen_delta_P,
        rejected_reward=beta * rejected_delta_P,
    )


def dpo_loss(
    beta: float, reference: Sequence[tuple[float, float]], response_starts: Sequence[int]
) -> PreferenceLossFn:
    """The DPO closure over datums `[c0, r0, c1, r1, ...]`.

    logπ(y) = Σ_{t ≥ k} lp_t(y), k = max(0, response_start - 1);
    margin_j = (logπ(c_j) - ref_c_j) - (logπ(r_j) - ref_r_j);
    loss = mean_j -log sigmoid(β · margin_j).
    `reference[j]` is (ref_c_j, ref_r_j) from `response_logprob_sums` of the reference model.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if len(reference) != len(response_starts):
        raise ValueError(f"{len(reference)} reference pairs for {len(response_starts)} pairs")
    ref_chosen_P = torch.tensor([c for c, _ in reference], dtype=torch.float64)
    ref_rejected_P = torch.tensor([r for _, r in reference], dtype=torch.float64)

    def loss_fn(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        _check_data(data, logprobs)
        slices = response_slices(logprobs, response_starts)
        chosen_P = torch.stack([c.sum() for c, _ in slices])
        rejected_P = torch.stack([r.sum() for _, r in slices])
        terms = dpo_terms(beta, chosen_P, rejected_P, ref_chosen_P, ref_rejected_P)
        loss = terms.loss.mean()
        return loss, _dpo_metrics(loss, terms)

    return loss_fn


def _dpo_metrics(loss: torch.Tensor, terms: DPOTerms) -> dict[str, float]:
    value = float(loss.detach().item())
    return {
        "train/dpo_loss": value,
        "train/loss": value,
        "train/margin": _mean(terms.margin),
        "train/accuracy": _mean(terms.margin > 0),
        "train/chosen_reward": _mean(terms.chosen_reward),
        "train/rejected_reward": _mean(terms.rejected_reward),
        "train/batch_pairs": float(terms.loss.numel()),
    }


# -- ORPO ---------------------------------------------------------------------------------------


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - e^a) for a < 0: log1p(-e^a) below -ln 2, log(-expm1(a)) above (each exact there)."""
    return torch.where(a < _LN_HALF, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def log_odds(avg_logprob: torch.Tensor) -> torch.Tensor:
    """logodds(a) = a - log(1 - e^a) with a clamped to [-50, -1e-6]: finite, finite gradient."""
    a = avg_logprob.clamp(ORPO_MIN_AVG_LOGPROB, ORPO_MAX_AVG_LOGPROB)
    return a - log1mexp(a)


@dataclass(frozen=True)
class ORPOTerms:
    """Per-pair ORPO quantities, each of shape (P,)."""

    loss: torch.Tensor
    sft_loss: torch.Tensor
    or_loss: torch.Tensor
    log_odds_ratio: torch.Tensor
    chosen_avg: torch.Tensor
    rejected_avg: torch.Tensor


def orpo_terms(
    orpo_lambda: float, chosen_avg_P: torch.Tensor, rejected_avg_P: torch.Tensor
) -> ORPOTerms:
    """L_sft = -a_c; LOR = logodds(a_c) - logodds(a_r); L_or = -log sigmoid(LOR);
    pair loss = L_sft + λ·L_or.
    """
    sft_loss_P = -chosen_avg_P
    log_odds_ratio_P = log_odds(chosen_avg_P) - log_odds(rejected_avg_P)
    or_loss_P = -logsigmoid(log_odds_ratio_P)
    return ORPOTerms(
        loss=sft_loss_P + orpo_lambda * or_loss_P,
        sft_loss=sft_loss_P,
        or_loss=or_loss_P,
        log_odds_ratio=log_odds_ratio_P,
        chosen_avg=chosen_avg_P,
        rejected_avg=rejected_avg_P,
    )


def orpo_loss(
    orpo_lambda: float,
    response_starts: Sequence[int],
    pair_reduction: PairReduction = "mean",
) -> PreferenceLossFn:
    """The ORPO closure over datums `[c0, r0, c1, r1, ...]`; no reference model.

    a_y = mean_{t ≥ k} lp_t(y) (length-normalised), k = max(0, response_start - 1);
    pair loss = -a_c + λ · (-log sigmoid(logodds(a_c) - logodds(a_r)));
    loss = mean (or sum) over pairs. `train/orpo_loss` is that loss; the other metrics are
    means over pairs.
    """
    if orpo_lambda < 0:
        raise ValueError(f"orpo_lambda must be >= 0, got {orpo_lambda}")
    if pair_reduction not in ("mean", "sum"):
        raise ValueError(f"pair_reduction must be 'mean' or 'sum', got {pair_reduction!r}")

    def loss_fn(
        data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        _check_data(data, logprobs)
        slices = response_slices(logprobs, response_starts)
        chosen_avg_P = torch.stack([c.mean() for c, _ in slices])
        rejected_avg_P = torch.stack([r.mean() for _, r in slices])
        terms = orpo_terms(orpo_lambda, chosen_avg_P, rejected_avg_P)
        loss = terms.loss.mean() if pair_reduction == "mean" else terms.loss.sum()
        return loss, _orpo_metrics(loss, terms)

    return loss_fn


def _orpo_metrics(loss: torch.Tensor, terms: ORPOTerms) -> dict[str, float]:
    value = float(loss.detach().item())
    return {
        "train/orpo_loss": value,
        "train/loss": value,
        "train/sft_loss": _mean(terms.sft_loss),
        "train/or_loss": _mean(terms.or_loss),
        "train/log_odds_ratio": _mean(terms.log_odds_ratio),
        "train/accuracy": _mean(terms.log_odds_ratio > 0),
        "train/chosen_avg_lp": _mean(terms.chosen_avg),
        "train/rejected_avg_lp": _mean(terms.rejected_avg),
        "train/batch_pairs": float(terms.loss.numel()),
    }


# -- shared ---------------------------------------------------------------------------------------


def eval_metrics(
    loss_fn: PreferenceLossFn, data: list[types.Datum], logprobs: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Held-out metrics from a forward pass: the loss closure's own metrics, under `eval/`.

    Runs the same closure the step trains with (no second copy of the math), without gradients.
    """
    with torch.no_grad():
        _, metrics = loss_fn(data, [lp.detach() for lp in logprobs])
    return {"eval/" + key.removeprefix("train/"): value for key, value in metrics.items()}


def _check_data(data: Sequence[types.Datum], logprobs: Sequence[torch.Tensor]) -> None:
    if len(data) != len(logprobs):
        raise ValueError(f"{len(data)} datums but {len(logprobs)} log-probability tensors")


def _mean(values: torch.Tensor) -> float:
    return float(values.detach().to(torch.float64).mean().item())
