"""SFT datums: the shift, the drop rules and the normalisation pairing."""

from __future__ import annotations

import pytest
from tinker import types

from algorithms.chat import ChatRenderer, SupervisedExample
from algorithms.datums import (
    NormalizationMismatchError,
    build_sft_batch,
    check_normalization,
    datum_from_tokens,
    drop_reason,
    grad_normalization,
    mean_ce_loss,
    sft_datum,
    weight_sum,
)
from algorithms.toy_tasks import reverse_row
from backend.models.tokenizers import build_byte_tokenizer


def _weights(datum: types.Datum) -> list[float]:
    return [float(w) for w in datum.loss_fn_inputs["weights"].tolist()]


def _targets(datum: types.Datum) -> list[int]:
    return [int(t) for t in datum.loss_fn_inputs["target_tokens"].tolist()]


def test_datum_shifts_tokens_and_weights() -> None:
    datum = datum_from_tokens([10, 11, 12, 13], [0.0, 0.0, 1.0, 1.0])
    assert datum.model_input.to_ints() == [10, 11, 12]
    assert _targets(datum) == [11, 12, 13]
    # A target's weight is its own token's weight: weights[1:].
    assert _weights(datum) == [0.0, 1.0, 1.0]
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["weights"].dtype == "float32"


def test_datum_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        datum_from_tokens([1, 2, 3], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        datum_from_tokens([1], [1.0])


def test_rendered_reversal_row_becomes_the_measured_datum() -> None:
    renderer = ChatRenderer(build_byte_tokenizer("plain"), name="plain")
    example = renderer.build_supervised_example(reverse_row("abcd").messages)
    datum = sft_datum(example, "batch_token_mean")
    # "abcd=" + "dcba" + EOS, shifted by one; loss on the targets "dcba" + EOS only.
    assert datum.model_input.to_ints() == [97, 98, 99, 100, 61, 100, 99, 98, 97]
    assert _targets(datum) == [98, 99, 100, 61, 100, 99, 98, 97, 258]
    assert _weights(datum) == [0.0] * 4 + [1.0] * 5


def test_example_mean_scales_each_example_to_weight_one() -> None:
    example = SupervisedExample(tokens=(1, 2, 3, 4, 5, 6), weights=(0, 0, 1, 1, 1, 1))
    assert _weights(sft_datum(example, "example_mean")) == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert _weights(sft_datum(example, "batch_token_mean")) == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert _weights(sft_datum(example, "token_sum")) == [0.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("tokens", "weights", "max_seq_len", "reason"),
    [
        ((1,), (1.0,), None, "too_short"),
        ((1, 2, 3, 4), (0.0, 1.0, 1.0, 1.0), 3, "too_long"),
        ((1, 2, 3), (1.0, 0.0, 0.0), None, "no_weight"),  # the first token is never a target
        ((1, 2, 3), (0.0, 0.0, 1.0), 3, None),
    ],
)
def test_drop_reasons(
    tokens: tuple[int, ...], weights: tuple[float, ...], max_seq_len: int | None, reason: str | None
) -> None:
    assert drop_reason(SupervisedExample(tokens, weights), max_seq_len) == reason


def test_batch_keeps_order_and_counts_dropped_rows() -> None:
    good = SupervisedExample((1, 2, 3), (0.0, 1.0, 1.0))
    long = SupervisedExample((1, 2, 3, 4, 5), (0.0, 1.0, 1.0, 1.0, 1.0))
    unweighted = SupervisedExample((1, 2, 3), (0.0, 0.0, 0.0))
    batch = build_sft_batch(
        [(7, good), (3, long), (9, unweighted), (4, good)],
        loss_reduction="batch_token_mean",
        max_seq_len=4,
    )
    assert batch.row_indices == (7, 4)
    assert [(d.row_index, d.reason, d.tokens) for d in batch.dropped] == [
        (3, "too_long", 5),
        (9, "no_weight", 3),
    ]
    assert batch.raw_rows == 4  # the cursor advances over dropped rows too
    assert len(batch.datums) == 2


def test_normalisation_pairs_exactly_one_rule() -> None:
    assert grad_normalization("batch_token_mean") == "num_loss_tokens"
    assert grad_normalization("example_mean") == "num_sequences"
    assert grad_normalization("token_sum") == "none"
    check_normalization("batch_token_mean", "num_loss_tokens")
    check_normalization("token_sum", None)  # None is optim_step's "none"
    with pytest.raises(NormalizationMismatchError, match="double or missing"):
        check_normalization("batch_token_mean", None)
    with pytest.raises(NormalizationMismatchError, match="num_sequences"):
        check_normalization("example_mean", "num_loss_tokens")


def test_logged_loss_divides_by_the_batch_weight() -> None:
    examples = [
        SupervisedExample((1, 2, 3, 4), (0.0, 1.0, 1.0, 1.0)),
        SupervisedExample((1, 2, 3), (0.0, 1.0, 1.0)),
    ]
    token_mean = [sft_datum(e, "batch_token_mean") for e in examples]
    assert weight_sum(token_mean) == 5.0
    assert mean_ce_loss(10.0, token_mean) == 2.0
    example_mean = [sft_datum(e, "example_mean") for e in examples]
    assert weight_sum(example_mean) == pytest.approx(2.0)  # Σ w = batch size
    with pytest.raises(ValueError, match="no positive weight"):
        mean_ce_loss(1.0, [datum_from_tokens([1, 2], [0.0, 0.0])])
