"""SFT datums: rendered examples -> tinker `Datum`s, the drop rules, and loss normalisation.

Every recipe shifts the same way: `model_input = tokens[:-1]`,
`target_tokens = tokens[1:]`, `weights = weights[1:]`, so a target's weight is its own token's.
The server's `cross_entropy` is a weighted *sum*; exactly one normalisation must turn it into the
loss the config names, so the weights and the `optim_step` normalisation are
chosen together here and checked as a pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from tinker import types

from algorithms.chat import SupervisedExample

logger = logging.getLogger(__name__)

LossReduction = Literal["batch_token_mean", "example_mean", "token_sum"]
# The values of `optim_step(grad_accumulation_normalization=...)` (sdk `GradAccNormalization`).
GradNormalization = Literal["num_loss_tokens", "num_sequences", "none"]
DropReason = Literal["too_short", "too_long", "no_weight"]

# loss_reduction -> the one normalisation that pairs with its weights:
#   batch_token_mean: raw 0/1 weights, server divides by Σ w over the step  -> Σ nll·w / Σ w
#   example_mean:     weights scaled to Σ_t w = 1 per example, server divides by the datums
#                     -> (1/N) Σ_i (Σ_t nll_it w_it / Σ_t w_it)   (fireloop choice)
#   token_sum:        raw 0/1 weights, no normalisation -> Σ nll·w (grows with batch tokens;
#                     kept only to match the reference cookbook's behaviour)
SFT_GRAD_NORMALIZATION: Final[dict[LossReduction, GradNormalization]] = {
    "batch_token_mean": "num_loss_tokens",
    "example_mean": "num_sequences",
    "token_sum": "none",
}


class NormalizationMismatchError(ValueError):
    """An `optim_step` normalisation that does not pair with the loss reduction: normalising
    twice or never scales the gradient wrongly, and silently."""


@dataclass(frozen=True)
class DroppedRow:
    """A row left out of a batch; it still counts as consumed by the data cursor."""

    row_index: int
    reason: DropReason
    tokens: int


@dataclass(frozen=True)
class SFTBatch:
    """The datums of one optimizer step and the rows that were dropped from it."""

    datums: tuple[types.Datum, ...]
    row_indices: tuple[int, ...]  # the rows behind `datums`, in order
    dropped: tuple[DroppedRow, ...]

    @property
    def raw_rows(self) -> int:
        """Rows consumed by this batch (kept + dropped): what the data cursor advances by."""
        return len(self.datums) + len(self.dropped)


def datum_from_tokens(tokens: Sequence[int], weights: Sequence[float]) -> types.Datum:
    """The shifted datum: input `tokens[:-1]`, targets `tokens[1:]`, weights `weights[1:]`."""
    if len(tokens) != len(weights):
        raise ValueError(f"tokens ({len(tokens)}) and weights ({len(weights)}) differ in length")
    if len(tokens) < 2:
        raise ValueError(f"a datum needs at least 2 tokens, got {len(tokens)}")
    targets = [int(token) for token in tokens[1:]]
    target_weights = [float(weight) for weight in weights[1:]]
    return types.Datum(
        model_input=types.ModelInput.from_ints([int(token) for token in tokens[:-1]]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(
                data=target_weights, dtype="float32", shape=[len(target_weights)]
            ),
        },
    )


def sft_datum(example: SupervisedExample, loss_reduction: LossReduction) -> types.Datum:
    """The datum of one example, with weights scaled as `loss_reduction` needs.

    `example_mean` divides the shifted weights by their sum (w'_t = w_t / Σ w), so each example
    contributes its mean token loss; the other reductions keep the raw 0/1 weights.
    """
    weights = list(example.weights)
    if loss_reduction == "example_mean":
        total = sum(weights[1:])
        if total <= 0:
            raise ValueError("example_mean: the example has no positive target weight")
        weights = [weights[0], *(weight / total for weight in weights[1:])]
    return datum_from_tokens(example.tokens, weights)


def drop_reason(example: SupervisedExample, max_seq_len: int | None) -> DropReason | None:
    """Why a rendered row cannot train, or None when it can.

    Dropped: < 2 tokens, more than `max_seq_len` tokens (whole rows are dropped, never
    truncated: a cut reply would teach the model to stop mid-answer), or no positive weight on
    any target (the first token is never a target).
    """
    if len(example.tokens) < 2:
        return "too_short"
    if max_seq_len is not None and len(example.tokens) > max_seq_len:
        return "too_long"
    if not any(weight > 0 for weight in example.weights[1:]):
        return "no_weight"
    return None


def build_sft_batch(
    examples: Sequence[tuple[int, SupervisedExample]],
    *,
    loss_reduction: LossReduction,
    max_seq_len: int | None,
) -> SFTBatch:
    """Datums for `(row_index, example)` pairs in order; rows that cannot train are counted."""
    datums: list[types.Datum] = []
    kept: list[int] = []
    dropped: list[DroppedRow] = []
    for row_index, example in examples:
        reason = drop_reason(example, max_seq_len)
        if reason is None:
            datums.append(sft_datum(example, loss_reduction))
            kept.append(row_index)
        else:
            dropped.append(DroppedRow(row_index, reason, len(example.tokens)))
    if dropped:
        logger.debug("dropped %d of %d rows: %s", len(dropped), len(examples), dropped)
    return SFTBatch(tuple(datums), tuple(kept), tuple(dropped))


def grad_normalization(loss_reduction: LossReduction) -> GradNormalization:
    """The `optim_step(grad_accumulation_normalization=...)` value for an SFT loss reduction."""
    return SFT_GRAD_NORMALIZATION[loss_reduction]


def check_normalization(loss_reduction: LossReduction, normalization: str | None) -> None:
    """Raise unless `normalization` pairs with `loss_reduction` (a wrong pair fails silently).

    `None` reads as `"none"`, as `optim_step` treats it.
    """
    expected = SFT_GRAD_NORMALIZATION[loss_reduction]
    if (normalization or "none") != expected:
        raise NormalizationMismatchError(
            f"loss_reduction={loss_reduction!r} needs grad_accumulation_normalization="
            f"{expected!r}, got {normalization!r} (double or missing normalisation)"
        )


def weight_sum(datums: Sequence[types.Datum]) -> float:
    """Σ w over every target of the datums: the denominator of the logged token-mean loss."""
    return float(sum(datum.loss_fn_inputs["weights"].to_numpy().sum() for datum in datums))


def mean_ce_loss(loss_sum: float, datums: Sequence[types.Datum]) -> float:
    """Logged SFT loss `ce = loss:sum / Σ w` (Σ w = batch size for example_mean)."""
    total = weight_sum(datums)
    if total <= 0:
        raise ValueError("the datums carry no positive weight")
    return loss_sum / total
