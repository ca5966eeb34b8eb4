"""The trainer's tinker 0.38 protobuf codec against bytes the 0.38 client itself produced.

The fixtures in `fixtures/tinker038/` were written by `tests/compat/capture_tinker038_fixtures.py`
under the published `tinker==0.38.0` (its request encoder, its generated message classes, checked
against its decoder), so these tests pin field numbers and layouts to the client's, not to our
reading of them. The end-to-end run with the real client is in `tests/compat/`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from backend.trainer.wire import ForwardBackwardOutput, SampledSequenceWire, SampleResult
from backend.trainer.wire_proto import (
    MESSAGES,
    ProtoDecodeError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_result,
    encode_sample_response,
    request_body,
    wants_proto,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tinker038"


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _parsed(message_name: str, data: bytes) -> Any:
    message = MESSAGES[message_name]()
    message.ParseFromString(data)
    return message


def test_forward_backward_request_from_the_client_decodes_to_the_json_command() -> None:
    forward_only, body = decode_forward_backward(_fixture("forward_backward_request.bin"))

    assert forward_only is False
    assert body == {
        "model_id": "s-1:train:0",
        "seq_id": 7,
        "forward_backward_input": {
            "loss_fn": "stable_reinforce",
            # v2 wins: it alone carries the string option.
            "loss_fn_config": {"kl_coeff": 0.01, "clip_low_threshold": 0.8, "mode": "token"},
            "data": [
                {
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 12]}]},
                    "loss_fn_inputs": {
                        "target_tokens": {"data": [9, 12, 2], "dtype": "int64", "shape": [3]},
                        "weights": {"data": [0.0, 1.0, 0.5], "dtype": "float32", "shape": [3]},
                    },
                },
                {
                    "model_input": {
                        "chunks": [
                            {"type": "encoded_text", "tokens": [7, 3]},
                            {"type": "encoded_text", "tokens": [300000]},
                        ]
                    },
                    "loss_fn_inputs": {
                        "target_tokens": {"data": [3, 1, 2], "dtype": "int64", "shape": [3]},
                        "logprobs": {
                            "data": [-1.5, -0.25, -3.0],
                            "dtype": "float32",
                            "shape": [3],
                        },
                        "advantages": {
                            "data": [0.0, 1.0, -1.0],
                            "dtype": "float32",
                            "shape": [3],
                        },
                    },
                },
            ],
        },
    }


def test_forward_only_request_becomes_a_forward_command() -> None:
    forward_only, body = decode_forward_backward(_fixture("forward_only_request.bin"))

    assert forward_only is True
    assert body["seq_id"] == 2
    assert "forward_backward_input" not in body
    assert body["forward_input"]["loss_fn"] == "cross_entropy"
    assert "loss_fn_config" not in body["forward_input"]  # none sent, none invented


def test_legacy_float_config_is_read_when_v2_is_absent() -> None:
    message = MESSAGES["ForwardBackwardRequest"](model_id="m", seq_id=1, loss_fn="ppo")
    message.loss_fn_config["clip_high_threshold"] = 1.25

    _, body = decode_forward_backward(message.SerializeToString())

    assert body["forward_backward_input"]["loss_fn_config"] == {"clip_high_threshold": 1.25}


def test_zstd_bodies_are_decompressed_and_other_encodings_refused() -> None:
    raw = _fixture("forward_backward_request.bin")
    compressed = zstandard.ZstdCompressor().compress(raw)

    assert request_body(compressed, "zstd") == raw
    assert request_body(raw, None) == raw
    with pytest.raises(ProtoDecodeError, match="gzip"):
        request_body(raw, "gzip")
    with pytest.raises(ProtoDecodeError, match="zstd"):
        request_body(b"not a frame", "zstd")


def test_garbage_is_a_decode_error_not_a_crash() -> None:
    with pytest.raises(ProtoDecodeError, match="ForwardBackwardRequest"):
        decode_forward_backward(b"\xff\xff\xff\xff")


def test_widened_and_unusable_tensors_reach_the_datum_check_in_json_form() -> None:
    message = MESSAGES["ForwardBackwardRequest"](model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = message.data.add()
    datum.model_input.add().image.format = "png"
    bf16 = np.asarray([1.0, -2.5], dtype=np.float32).view(np.uint32) >> 16
    datum.loss_fn_inputs["weights"].dense = bf16.astype(np.uint16).tobytes()
    datum.loss_fn_inputs["weights"].dtype = 4  # bfloat16
    datum.loss_fn_inputs["target_tokens"].dense = np.asarray([3, 4], dtype=np.int32).tobytes()
    datum.loss_fn_inputs["target_tokens"].dtype = 3  # int32
    sparse = datum.loss_fn_inputs["advantages"]
    sparse.dtype = 1
    sparse.sparse_csr.values = np.asarray([0.5], dtype=np.float32).tobytes()

    _, body = decode_forward_backward(message.SerializeToString())

    decoded = body["forward_backward_input"]["data"][0]
    assert decoded["model_input"]["chunks"] == [{"type": "image"}]
    assert decoded["loss_fn_inputs"]["weights"] == {
        "data": [1.0, -2.5],
        "dtype": "float32",
        "shape": None,
    }
    assert decoded["loss_fn_inputs"]["target_tokens"]["data"] == [3, 4]
    assert decoded["loss_fn_inputs"]["target_tokens"]["dtype"] == "int64"
    assert decoded["loss_fn_inputs"]["advantages"]["sparse_crow_indices"] == []


def test_forward_backward_output_matches_the_clients_own_encoding() -> None:
    result = {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {
                "logprobs": {"data": [-0.5, -1.0, -2.0], "dtype": "float32", "shape": [3]},
                "elementwise_loss": {"data": [0.0, 1.0, 0.25], "dtype": "float32", "shape": [3]},
            },
            {
                "logprobs": {"data": [-0.25, -4.0], "dtype": "float32", "shape": [2]},
                "elementwise_loss": {"data": [0.0, 0.0], "dtype": "float32", "shape": [2]},
            },
        ],
        "metrics": {"loss:sum": 1.25},
    }

    ours = _parsed("ForwardBackwardOutput", encode_forward_backward_output(result))
    theirs = _parsed("ForwardBackwardOutput", _fixture("forward_backward_output.bin"))

    assert ours == theirs
    offsets = np.frombuffer(ours.loss_fn_outputs[0].fields["logprobs"].offsets, dtype="<i8")
    assert offsets.tolist() == [0, 12, 20]  # byte offsets, from 0, one per datum boundary


def test_forward_backward_output_without_datums_is_valid() -> None:
    message = _parsed(
        "ForwardBackwardOutput",
        encode_result(ForwardBackwardOutput(loss_fn_outputs=[], metrics={})),
    )
    assert message.loss_fn_output_type == "ArrayRecord"
    assert message.loss_fn_outputs[0].num_datums == 0


def test_sample_response_matches_the_clients_own_encoding() -> None:
    result = {
        "type": "sample",
        "sequences": [
            {"stop_reason": "stop", "tokens": [4, 2], "logprobs": [-0.5, -1.5]},
            {"stop_reason": "length", "tokens": [7, 7, 9], "logprobs": [-2.0, -0.125, -1.0]},
        ],
        "prompt_logprobs": [None, -3.0, -0.75],
        "topk_prompt_logprobs": [None, [[5, -0.5], [6, -1.0]], [[8, -0.25]]],
        "prompt_cache_hit_tokens": 0,
    }

    ours = _parsed("SampleResponse", encode_sample_response(result))
    theirs = _parsed("SampleResponse", _fixture("sample_response.bin"))

    assert ours == theirs
    prompt = np.frombuffer(ours.prompt_logprobs, dtype="<f4")
    assert math.isnan(prompt[0])  # NaN is how the protobuf dialect says "no logprob here"


def test_a_sequence_without_logprobs_leaves_the_field_unset() -> None:
    message = _parsed(
        "SampleResponse",
        encode_result(
            SampleResult(sequences=[SampledSequenceWire(stop_reason="stop", tokens=[1])])
        ),
    )
    assert message.sequences[0].logprobs == b""
    assert not message.HasField("topk_prompt_logprobs")
    assert message.prompt_logprobs == b""


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/x-protobuf", True),  # tinker 0.38 on fwd/bwd and sample results
        ("application/x-protobuf, application/json", False),  # tinker 0.23: JSON wins
        ("application/json", False),
        (None, False),
        ("*/*", False),
    ],
)
def test_protobuf_answers_only_when_json_is_not_acceptable(
    accept: str | None, expected: bool
) -> None:
    assert wants_proto(accept) is expected
