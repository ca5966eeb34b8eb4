"""The protobuf dialect of tinker ≥ 0.38: fwd/bwd requests in, fwd/bwd and sample results out.

The messages are declared here from the wire facts (package `tinker_public`, field numbers and
types as the 0.38 client encodes and decodes them) and built into a private descriptor pool, so
the trainer needs only the `protobuf` runtime, never the client's generated module. This is the
codec edge: a request is turned into the same typed command a 0.23 JSON body decodes into, and a
typed result the operations produced is turned into bytes, so nothing behind the routes knows
which dialect a client speaks. Numeric arrays are little-endian raw bytes; a `BatchedTensor` is the
datums' arrays concatenated with int64 *byte* offsets (num_datums + 1, from 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]

from backend.trainer.errors import UserError
from backend.trainer.wire import (
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardRequest,
    SampleResult,
    parse_command,
)

JsonDict = dict[str, Any]

PROTO_MEDIA_TYPE = "application/x-protobuf"
# The results a 0.38 client accepts only as protobuf (fwd/bwd, forward and sample).
PROTO_RESULTS = (ForwardBackwardOutput, SampleResult)

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "tinker_public"
# Empty top-k cells, as the client's decoder expects them.
_TOPK_EMPTY_TOKEN, _TOPK_EMPTY_LOGPROB = 0, -99999.0

# DType enum values.
DTYPE_UNSPECIFIED, DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 0, 1, 2, 3, 4
STOP_REASON_STOP, STOP_REASON_LENGTH = 0, 1

_B, _S, _I32, _I64, _U32, _D, _BOOL = (
    _F.TYPE_BYTES,
    _F.TYPE_STRING,
    _F.TYPE_INT32,
    _F.TYPE_INT64,
    _F.TYPE_UINT32,
    _F.TYPE_DOUBLE,
    _F.TYPE_BOOL,
)
_MSG, _ENUM = _F.TYPE_MESSAGE, _F.TYPE_ENUM


@dataclass(frozen=True)
class _Field:
    number: int
    name: str
    kind: int
    ref: str | None = None  # the message or enum type of a message/enum field
    repeated: bool = False
    oneof: str | None = None
    map_value: bool = False  # a map<string, kind/ref>


def _f(number: int, name: str, kind: int, ref: str | None = None, **flags: Any) -> _Field:
    return _Field(number, name, kind, ref, **flags)


_MESSAGES: dict[str, list[_Field]] = {
    "SparseCsr": [_f(1, "values", _B), _f(2, "crow_indices", _B), _f(3, "col_indices", _B)],
    "Tensor": [
        _f(1, "dense", _B, oneof="encoding"),
        _f(2, "sparse_csr", _MSG, "SparseCsr", oneof="encoding"),
        _f(3, "dtype", _ENUM, "DType"),
        _f(4, "shape", _I64, repeated=True),
    ],
    "EncodedTextChunk": [_f(1, "tokens", _B)],
    "ImageChunk": [_f(1, "data", _B), _f(2, "format", _S)],
    "DmelChunk": [_f(1, "dmel", _B)],
    "Chunk": [
        _f(1, "encoded_text", _MSG, "EncodedTextChunk", oneof="chunk"),
        _f(2, "image", _MSG, "ImageChunk", oneof="chunk"),
        _f(3, "dmel", _MSG, "DmelChunk", oneof="chunk"),
    ],
    "Datum": [
        _f(1, "model_input", _MSG, "Chunk", repeated=True),
        _f(2, "loss_fn_inputs", _MSG, "Tensor", map_value=True),
    ],
    "LossConfigValue": [_f(1, "number", _D, oneof="value"), _f(2, "text", _S, oneof="value")],
    "ForwardBackwardRequest": [
        _f(1, "model_id", _S),
        _f(2, "seq_id", _I32),
        _f(3, "data", _MSG, "Datum", repeated=True),
        _f(4, "loss_fn", _S),
        _f(5, "loss_fn_config", _D, map_value=True),
        _f(6, "forward_only", _BOOL),
        _f(7, "loss_fn_config_v2", _MSG, "LossConfigValue", map_value=True),
    ],
    "BatchedTensor": [
        _f(1, "data", _B),
        _f(2, "offsets", _B),
        _f(3, "dtype", _ENUM, "DType"),
        _f(4, "trailing_shape", _I64, repeated=True),
    ],
    "ArrayRecord": [
        _f(1, "type_tag", _S),
        _f(2, "fields", _MSG, "BatchedTensor", map_value=True),
        _f(3, "num_datums", _I64),
    ],
    "ForwardBackwardOutput": [
        _f(1, "loss_fn_output_type", _S),
        _f(2, "loss_fn_outputs", _MSG, "ArrayRecord", repeated=True),
        _f(3, "metrics", _D, map_value=True),
    ],
    "TopkLogprobs": [
        _f(1, "token_ids", _B),
        _f(2, "logprobs", _B),
        _f(3, "k", _U32),
        _f(4, "length", _U32),
    ],
    "SampledSequence": [
        _f(1, "stop_reason", _ENUM, "StopReason"),
        _f(2, "tokens", _B),
        _f(3, "logprobs", _B),
        _f(4, "topk_sampled_logprobs", _MSG, "TopkLogprobs"),
    ],
    "SampleResponse": [
        _f(1, "sequences", _MSG, "SampledSequence", repeated=True),
        _f(2, "prompt_logprobs", _B),
        _f(3, "topk_prompt_logprobs", _MSG, "TopkLogprobs"),
        _f(4, "prompt_cache_hit_tokens", _I32),
    ],
}
_ENUMS = {
    "DType": [
        ("DTYPE_UNSPECIFIED", DTYPE_UNSPECIFIED),
        ("DTYPE_FLOAT32", DTYPE_FLOAT32),
        ("DTYPE_INT64", DTYPE_INT64),
        ("DTYPE_INT32", DTYPE_INT32),
        ("DTYPE_BFLOAT16", DTYPE_BFLOAT16),
    ],
    "StopReason": [
        ("STOP_REASON_STOP", STOP_REASON_STOP),
        ("STOP_REASON_LENGTH", STOP_REASON_LENGTH),
    ],
}


def _add_field(target: Any, number: int, name: str, kind: int, ref: str | None) -> Any:
    field = target.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    if ref is not None:
        field.type_name = f".{_PACKAGE}.{ref}"
    return field


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="fireloop/tinker_public.proto", package=_PACKAGE, syntax="proto3"
    )
    for enum_name, values in _ENUMS.items():
        enum = file.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        oneofs = list(dict.fromkeys(f.oneof for f in fields if f.oneof is not None))
        for oneof in oneofs:
            message.oneof_decl.add(name=oneof)
        for spec in fields:
            if spec.map_value:
                # A map is a repeated nested `<Name>Entry {key = 1; value = 2}` marked map_entry.
                entry_name = "".join(part.title() for part in spec.name.split("_")) + "Entry"
                entry = message.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                _add_field(entry, 1, "key", _S, None)
                _add_field(entry, 2, "value", spec.kind, spec.ref)
                field = _add_field(message, spec.number, spec.name, _MSG, f"{name}.{entry_name}")
                field.label = _F.LABEL_REPEATED
                continue
            field = _add_field(message, spec.number, spec.name, spec.kind, spec.ref)
            if spec.repeated:
                field.label = _F.LABEL_REPEATED
            if spec.oneof is not None:
                field.oneof_index = oneofs.index(spec.oneof)
    return file


def _classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_build_file())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in _MESSAGES
    }


MESSAGES = _classes()


class ProtoDecodeError(ValueError):
    """A body that is not the protobuf message (or zstd frame) it claims to be."""


# -- requests ------------------------------------------------------------------------------

_NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    DTYPE_FLOAT32: np.dtype("<f4"),
    DTYPE_INT64: np.dtype("<i8"),
    DTYPE_INT32: np.dtype("<i4"),
    DTYPE_BFLOAT16: np.dtype("<u2"),
}
# int32 and bfloat16 are widened, as the client does when it reads them.
_WIRE_NAMES = {
    DTYPE_FLOAT32: "float32",
    DTYPE_INT64: "int64",
    DTYPE_INT32: "int64",
    DTYPE_BFLOAT16: "float32",
}


def request_body(raw: bytes, content_encoding: str | None) -> bytes:
    """The protobuf bytes of a request body, undoing `Content-Encoding: zstd`."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return raw
    if encoding != "zstd":
        raise ProtoDecodeError(f"Content-Encoding {content_encoding!r} is not supported (zstd is)")
    try:
        # max_output_size: a frame written by the streaming API has no content size in its header.
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 31)
    except zstandard.ZstdError as exc:
        raise ProtoDecodeError(f"body is not a valid zstd frame: {exc}") from None


def decode_forward_backward(data: bytes) -> tuple[bool, JsonDict]:
    """A `ForwardBackwardRequest` as (forward_only, the JSON body a 0.23 client would send).

    Conversion is total: chunks and tensors this trainer cannot use are passed on in their JSON
    form, so the operation refuses them with the same message (and after consuming the seq id)
    as for a JSON client.
    """
    message: Any = MESSAGES["ForwardBackwardRequest"]()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtoDecodeError(f"body is not a tinker ForwardBackwardRequest: {exc}") from None
    loss_input: JsonDict = {
        "data": [_datum_json(datum) for datum in message.data],
        "loss_fn": message.loss_fn,
    }
    config = _loss_config(message)
    if config:
        loss_input["loss_fn_config"] = config
    key = "forward_input" if message.forward_only else "forward_backward_input"
    body = {"model_id": message.model_id, "seq_id": message.seq_id, key: loss_input}
    return bool(message.forward_only), body


@dataclass(frozen=True)
class ProtoForwardBackward:
    """A decoded protobuf fwd/bwd request: its ids and its typed command (or why it has none,
    which still consumes the seq id, as for a malformed JSON body)."""

    model_id: str
    seq_id: int
    forward_only: bool
    command: ForwardRequest | ForwardBackwardRequest | UserError


def decode_forward_backward_command(data: bytes) -> ProtoForwardBackward:
    """A `ForwardBackwardRequest` as its typed command (`forward_only` makes it a forward).

    ProtoDecodeError: the bytes are not that message.
    """
    forward_only, body = decode_forward_backward(data)
    command: ForwardRequest | ForwardBackwardRequest | UserError
    try:
        parsed = parse_command("forward" if forward_only else "forward_backward", body)
        assert isinstance(parsed, ForwardRequest | ForwardBackwardRequest)
        command = parsed
    except UserError as exc:
        command = exc
    return ProtoForwardBackward(body["model_id"], body["seq_id"], forward_only, command)


def _loss_config(message: Any) -> dict[str, float | str]:
    # The client writes every float key to both maps and strings only to v2; v2 wins when set.
    if len(message.loss_fn_config_v2):
        config: dict[str, float | str] = {}
        for key, value in message.loss_fn_config_v2.items():
            config[key] = value.text if value.WhichOneof("value") == "text" else value.number
        return config
    return {key: float(value) for key, value in message.loss_fn_config.items()}


def _datum_json(datum: Any) -> JsonDict:
    chunks: list[JsonDict] = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            tokens = np.frombuffer(chunk.encoded_text.tokens, dtype="<i4")
            chunks.append({"type": "encoded_text", "tokens": tokens.tolist()})
        else:
            chunks.append({"type": kind or "empty"})
    inputs = {key: _tensor_json(tensor) for key, tensor in datum.loss_fn_inputs.items()}
    return {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs}


def _tensor_json(tensor: Any) -> JsonDict:
    wire = _WIRE_NAMES.get(tensor.dtype, f"dtype enum {tensor.dtype}")
    dtype = _NUMPY_DTYPES.get(tensor.dtype)
    shape = list(tensor.shape) or None
    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype) if dtype else np.zeros(0)
        return {
            "data": _widen(values, tensor.dtype).tolist(),
            "dtype": wire,
            "shape": shape,
            "sparse_crow_indices": np.frombuffer(csr.crow_indices, dtype="<i8").tolist(),
            "sparse_col_indices": np.frombuffer(csr.col_indices, dtype="<i8").tolist(),
        }
    if dtype is None:
        return {"data": [], "dtype": wire, "shape": shape}
    if len(tensor.dense) % dtype.itemsize:
        # Left to the datum check, which names the field: a length that matches no shape.
        return {"data": [], "dtype": wire, "shape": shape or [-1]}
    values = _widen(np.frombuffer(tensor.dense, dtype=dtype), tensor.dtype)
    return {"data": values.tolist(), "dtype": wire, "shape": shape}


def _widen(values: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == DTYPE_BFLOAT16:  # bf16 is the upper half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    if dtype == DTYPE_INT32:
        return values.astype(np.int64)
    return values


# -- results -------------------------------------------------------------------------------

_NUMPY_OF_WIRE: dict[str, tuple[np.dtype[Any], int]] = {
    "float32": (np.dtype("<f4"), DTYPE_FLOAT32),
    "int64": (np.dtype("<i8"), DTYPE_INT64),
}


def encode_result(result: ForwardBackwardOutput | SampleResult) -> bytes:
    """A successful fwd/bwd or sample result, as the operations returned it, as protobuf."""
    if isinstance(result, SampleResult):
        return encode_sample_response(result.wire_json())
    return encode_forward_backward_output(result.wire_json())


def encode_forward_backward_output(result: Mapping[str, Any]) -> bytes:
    """`ForwardBackwardOutput` with one batched `ArrayRecord` holding every datum."""
    message: Any = MESSAGES["ForwardBackwardOutput"]()
    message.loss_fn_output_type = str(result.get("loss_fn_output_type") or "ArrayRecord")
    for key, value in (result.get("metrics") or {}).items():
        message.metrics[key] = float(value)
    outputs: Sequence[Mapping[str, Any]] = result.get("loss_fn_outputs") or []
    record = message.loss_fn_outputs.add()
    record.type_tag = message.loss_fn_output_type
    record.num_datums = len(outputs)
    names = list(outputs[0]) if outputs else []
    for name in names:
        _batch_field(record.fields[name], [output[name] for output in outputs])
    return bytes(message.SerializeToString())


def _batch_field(target: Any, tensors: Sequence[Mapping[str, Any]]) -> None:
    wire = str(tensors[0].get("dtype") or "float32")
    dtype, enum = _NUMPY_OF_WIRE[wire]
    shape = list(tensors[0].get("shape") or [])
    arrays = [np.asarray(t["data"], dtype=dtype).reshape(-1) for t in tensors]
    offsets = np.zeros(len(arrays) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    target.data = b"".join(a.tobytes() for a in arrays)
    target.offsets = offsets.tobytes()
    target.dtype = enum
    target.trailing_shape.extend(shape[1:])


def encode_sample_response(result: Mapping[str, Any]) -> bytes:
    """`SampleResponse`: int32 tokens, float32 logprobs, NaN where a prompt position has none."""
    message: Any = MESSAGES["SampleResponse"]()
    for sequence in result.get("sequences") or []:
        out = message.sequences.add()
        stop = sequence.get("stop_reason")
        out.stop_reason = STOP_REASON_LENGTH if stop == "length" else STOP_REASON_STOP
        out.tokens = np.asarray(sequence.get("tokens") or [], dtype="<i4").tobytes()
        logprobs = sequence.get("logprobs")
        if logprobs:
            out.logprobs = np.asarray(logprobs, dtype="<f4").tobytes()
    prompt = result.get("prompt_logprobs")
    if prompt:
        values = [math.nan if value is None else value for value in prompt]
        message.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    topk = result.get("topk_prompt_logprobs")
    if topk:
        _topk(message.topk_prompt_logprobs, topk)
    message.prompt_cache_hit_tokens = int(result.get("prompt_cache_hit_tokens") or 0)
    return bytes(message.SerializeToString())


def _topk(target: Any, rows: Sequence[Sequence[Sequence[float]] | None]) -> None:
    """Dense top-k rows (positions x k); a missing row (prompt position 0) is all empty cells."""
    k = max((len(row) for row in rows if row), default=0)
    ids = np.full((len(rows), k), _TOPK_EMPTY_TOKEN, dtype="<i4")
    logprobs = np.full((len(rows), k), _TOPK_EMPTY_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], logprobs[i, j] = int(token), float(logprob)
    target.token_ids, target.logprobs = ids.tobytes(), logprobs.tobytes()
    target.k, target.length = k, len(rows)


def wants_proto(accept: str | None) -> bool:
    """A 0.38 client asks for protobuf alone; 0.23 lists protobuf *and* JSON and gets JSON."""
    media = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    return PROTO_MEDIA_TYPE in media and "application/json" not in media
