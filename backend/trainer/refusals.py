"""The model id and seq id of an ordered request whose body the trainer refused.

A refused ordered request must still consume its seq id when the client's ids can be read:
otherwise the client's next ordered call waits for it until the gap timeout. The ids are read
leniently here, from a JSON object or from the leading fields of a protobuf message (tinker 0.38
writes `model_id` as field 1 and `seq_id` as field 2, so a truncated body usually keeps them).
"""

from __future__ import annotations

import json

__all__ = ["read_ordered_ids"]

_PROTO_MEDIA_TYPE = "application/x-protobuf"
_MODEL_ID_FIELD, _SEQ_ID_FIELD = 1, 2
_INT32_MAX = 2**31 - 1


def read_ordered_ids(
    raw: bytes, content_type: str | None, content_encoding: str | None = None
) -> tuple[str, int] | None:
    """(model id, seq id) when both can be read from the body, else None."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == _PROTO_MEDIA_TYPE:
        data = _decompressed(raw, content_encoding)
        return None if data is None else _proto_ids(data)
    return _json_ids(raw)


def _json_ids(raw: bytes) -> tuple[str, int] | None:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if not isinstance(model_id, str) or not model_id:
        return None
    if isinstance(seq_id, bool) or not isinstance(seq_id, int):
        return None
    return model_id, seq_id


def _decompressed(raw: bytes, content_encoding: str | None) -> bytes | None:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return raw
    if encoding != "zstd":
        return None
    try:
        import zstandard
    except ImportError:
        return None
    try:
        # A stream decoder returns what it could decode of a damaged or truncated frame.
        out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except zstandard.ZstdError:
        return None
    return out


def _proto_ids(data: bytes) -> tuple[str, int] | None:
    """Scan top-level fields until both ids are read or the bytes stop making sense."""
    model_id: str | None = None
    seq_id: int | None = None
    pos = 0
    while pos < len(data) and (model_id is None or seq_id is None):
        tag, pos = _varint(data, pos)
        if tag is None:
            break
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            if value is None:
                break
            if field == _SEQ_ID_FIELD and value <= _INT32_MAX:  # larger: a negative int32
                seq_id = value
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if length is None or pos + length > len(data):
                break
            chunk, pos = data[pos : pos + length], pos + length
            if field == _MODEL_ID_FIELD:
                try:
                    model_id = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    break
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:  # groups (deprecated) or garbage: nothing further can be trusted
            break
    if not model_id or seq_id is None:
        return None
    return model_id, seq_id


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos
