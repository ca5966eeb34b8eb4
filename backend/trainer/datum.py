"""Datums as the engine sees them: decoded from tinker 0.23 JSON and validated before any compute.

Validation happens for the whole batch up front so a bad datum fails the request with a message
naming the datum index and field, and never leaves half-accumulated gradients behind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backend.trainer.errors import UserError

# `_key_to_type` of tinker 0.23 (plus 0.38's `sequence_ratio_mask`): the dtype of each known
# loss input, used when the JSON omits `dtype`. Every known input is per token, shape (N,).
INPUT_DTYPES: dict[str, torch.dtype] = {
    "target_tokens": torch.int64,
    "weights": torch.float32,
    "advantages": torch.float32,
    "logprobs": torch.float32,
    "clip_low_threshold": torch.float32,
    "clip_high_threshold": torch.float32,
    "sequence_ratio_mask": torch.float32,
}
_WIRE_DTYPES: dict[str, torch.dtype] = {"int64": torch.int64, "float32": torch.float32}


@dataclass(frozen=True)
class Datum:
    """One training example: N input tokens and per-token loss inputs, each a (N,) CPU tensor."""

    tokens: list[int]
    loss_fn_inputs: dict[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def decode_datum(obj: Mapping[str, Any], index: int) -> Datum:
    """Decode one tinker JSON `Datum`; structural problems raise `UserError` naming the field."""
    where = f"data[{index}]"
    model_input = _field(obj, "model_input", where, Mapping)
    chunks = _field(model_input, "chunks", f"{where}.model_input", list)
    tokens: list[int] = []
    for chunk_index, chunk in enumerate(chunks):
        chunk_where = f"{where}.model_input.chunks[{chunk_index}]"
        if not isinstance(chunk, Mapping):
            raise UserError(f"{chunk_where} must be an object")
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise UserError(f"{chunk_where}: {kind!r} chunks are not supported (text-only model)")
        chunk_tokens = _field(chunk, "tokens", chunk_where, list)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in chunk_tokens):
            raise UserError(f"{chunk_where}.tokens must be a list of integers")
        tokens.extend(chunk_tokens)
    raw_inputs = obj.get("loss_fn_inputs") or {}
    if not isinstance(raw_inputs, Mapping):
        raise UserError(f"{where}.loss_fn_inputs must be an object")
    inputs = {
        key: decode_tensor_data(value, f"{where}.loss_fn_inputs.{key}", INPUT_DTYPES.get(key))
        for key, value in raw_inputs.items()
    }
    return Datum(tokens=tokens, loss_fn_inputs=inputs)


def decode_tensor_data(obj: Any, where: str, default_dtype: torch.dtype | None) -> torch.Tensor:
    """Decode a dense tinker `TensorData` (`data` row-major, `dtype`, optional `shape`)."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{where} must be a TensorData object")
    if obj.get("sparse_crow_indices") is not None or obj.get("sparse_col_indices") is not None:
        raise UserError(f"{where}: sparse TensorData is not supported; send dense data")
    wire_dtype = obj.get("dtype")
    dtype = _WIRE_DTYPES.get(wire_dtype) if wire_dtype is not None else default_dtype
    if dtype is None:
        raise UserError(f"{where}.dtype must be one of {sorted(_WIRE_DTYPES)}, got {wire_dtype!r}")
    data = _field(obj, "data", where, list)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in data):
        raise UserError(f"{where}.data must be a flat list of numbers")
    if dtype == torch.int64 and not all(isinstance(x, int) or float(x).is_integer() for x in data):
        raise UserError(f"{where}.data must hold integers for dtype int64")
    try:
        tensor = torch.tensor(data, dtype=dtype)
    except (OverflowError, RuntimeError, ValueError) as exc:
        raise UserError(f"{where}.data cannot be read as {_wire_name(dtype)}: {exc}") from exc
    if default_dtype == torch.float32:
        # Integer weights or advantages (e.g. from an int numpy array) are still numbers.
        tensor = tensor.to(torch.float32)
    shape = obj.get("shape")
    if shape is None:
        return tensor
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UserError(f"{where}.shape must be a list of non-negative integers")
    if math.prod(shape) != tensor.numel():
        raise UserError(f"{where}: shape {shape} does not match {tensor.numel()} data elements")
    return tensor.reshape(shape)


def encode_tensor_data(tensor: torch.Tensor) -> dict[str, Any]:
    """The tinker JSON `TensorData` of a float32 or int64 tensor (for results such as logprobs)."""
    dtype = "int64" if tensor.dtype == torch.int64 else "float32"
    values = tensor.detach().to("cpu", torch.int64 if dtype == "int64" else torch.float32)
    return {"data": values.flatten().tolist(), "dtype": dtype, "shape": list(values.shape)}


def validate_datums(datums: Sequence[Datum], *, context_length: int, vocab_size: int) -> None:
    """Check every datum against the model: lengths, id ranges, per-token shapes."""
    if not datums:
        raise UserError("data must contain at least one datum")
    for index, datum in enumerate(datums):
        _validate_datum(datum, index, context_length=context_length, vocab_size=vocab_size)


def _validate_datum(datum: Datum, index: int, *, context_length: int, vocab_size: int) -> None:
    where = f"data[{index}]"
    n = datum.num_tokens
    if n == 0:
        raise UserError(f"{where}.model_input has no tokens")
    if n > context_length:
        raise UserError(
            f"{where}.model_input has {n} tokens, more than the model context of {context_length}"
        )
    if min(datum.tokens) < 0 or max(datum.tokens) >= vocab_size:
        raise UserError(f"{where}.model_input.tokens must be in [0, {vocab_size}) (vocab size)")
    if "target_tokens" not in datum.loss_fn_inputs:
        raise UserError(f"{where}.loss_fn_inputs.target_tokens is required")
    for key, tensor in datum.loss_fn_inputs.items():
        field = f"{where}.loss_fn_inputs.{key}"
        if key not in INPUT_DTYPES:
            raise UserError(f"{field}: unknown loss input; known: {', '.join(INPUT_DTYPES)}")
        if tuple(tensor.shape) != (n,):
            raise UserError(
                f"{field} has shape {list(tensor.shape)}, expected [{n}] (one per input token)"
            )
        if tensor.dtype != INPUT_DTYPES[key]:
            raise UserError(f"{field} must have dtype {_wire_name(INPUT_DTYPES[key])}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{field} contains NaN or infinite values")
    targets = datum.loss_fn_inputs["target_tokens"]
    if int(targets.min()) < 0 or int(targets.max()) >= vocab_size:
        raise UserError(
            f"{where}.loss_fn_inputs.target_tokens must be in [0, {vocab_size}) (vocab size)"
        )


def _wire_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _WIRE_DTYPES.items() if value == dtype)


def _field(obj: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        expected = "an object" if kind is Mapping else f"a {kind.__name__}"
        raise UserError(f"{where}.{key} is required and must be {expected}")
    return value
