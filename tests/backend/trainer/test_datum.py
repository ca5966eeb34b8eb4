"""Decoding tinker 0.23 JSON datums and validating them against a model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from backend.trainer.datum import (
    Datum,
    decode_datum,
    decode_tensor_data,
    encode_tensor_data,
    validate_datums,
)
from backend.trainer.errors import UserError

EXAMPLE = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 12, 7]}]},
    "loss_fn_inputs": {
        "target_tokens": {"data": [9, 12, 7, 2], "dtype": "int64", "shape": [4]},
        "weights": {"data": [0.0, 0.0, 1.0, 1.0], "dtype": "float32", "shape": [4]},
    },
}


def test_decodes_the_spec_example() -> None:
    datum = decode_datum(EXAMPLE, 0)
    assert datum.tokens == [5, 9, 12, 7]
    assert torch.equal(datum.loss_fn_inputs["target_tokens"], torch.tensor([9, 12, 7, 2]))
    assert datum.loss_fn_inputs["weights"].dtype == torch.float32
    validate_datums([datum], context_length=8, vocab_size=16)


def test_chunks_concatenate_and_routing_matrices_are_ignored() -> None:
    obj = {
        "model_input": {
            "chunks": [{"type": "encoded_text", "tokens": [1, 2]}, {"tokens": [3]}],
            "routing_matrices": ["AAAA", "AAAA", "AAAA"],
        },
        "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4]}},  # dtype from the key
    }
    datum = decode_datum(obj, 0)
    assert datum.tokens == [1, 2, 3]
    assert datum.loss_fn_inputs["target_tokens"].dtype == torch.int64


def test_integer_weights_become_float32() -> None:
    tensor = decode_tensor_data({"data": [1, 0], "dtype": "int64"}, "w", torch.float32)
    assert tensor.dtype == torch.float32


def test_encode_round_trips() -> None:
    tensor = torch.tensor([-0.5, -1.25])
    encoded = encode_tensor_data(tensor)
    assert encoded == {"data": [-0.5, -1.25], "dtype": "float32", "shape": [2]}
    assert torch.equal(decode_tensor_data(encoded, "x", None), tensor)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["model_input"]["chunks"].append(
                {"type": "image", "data": "", "format": "png"}
            ),
            r"data\[2\]\.model_input\.chunks\[1\]: 'image' chunks are not supported",
        ),
        (
            lambda d: d["loss_fn_inputs"]["weights"].update(
                sparse_crow_indices=[0, 1], sparse_col_indices=[0]
            ),
            r"data\[2\]\.loss_fn_inputs\.weights: sparse TensorData is not supported",
        ),
        (
            lambda d: d["loss_fn_inputs"]["weights"].update(shape=[5]),
            r"data\[2\]\.loss_fn_inputs\.weights: shape \[5\] does not match 4",
        ),
        (
            lambda d: d["loss_fn_inputs"]["weights"].update(dtype="float16"),
            r"data\[2\]\.loss_fn_inputs\.weights\.dtype must be one of",
        ),
        (
            lambda d: d["loss_fn_inputs"]["target_tokens"].update(data=[1.5, 2, 3, 4]),
            r"target_tokens\.data must hold integers",
        ),
        (lambda d: d.pop("model_input"), r"data\[2\]\.model_input is required"),
    ],
)
def test_malformed_json_names_the_datum_and_field(mutate: Any, message: str) -> None:
    obj = copy.deepcopy(EXAMPLE)
    mutate(obj)
    with pytest.raises(UserError, match=message):
        decode_datum(obj, 2)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"target_tokens": torch.tensor([1, 2]), "mask": torch.ones(2)},
            "mask: unknown loss input",
        ),
        ({"target_tokens": torch.tensor([1.0, 2.0])}, "target_tokens must have dtype int64"),
        (
            {"target_tokens": torch.tensor([1, 2]), "weights": torch.tensor([1.0, float("nan")])},
            "weights contains NaN",
        ),
        ({"target_tokens": torch.tensor([[1, 2]])}, r"has shape \[1, 2\], expected \[2\]"),
    ],
)
def test_validation_rejects_bad_inputs(inputs: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(UserError, match=message):
        validate_datums(
            [Datum(tokens=[3, 4], loss_fn_inputs=inputs)], context_length=8, vocab_size=16
        )
