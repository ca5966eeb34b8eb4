"""Writes the protobuf bytes the tinker 0.38 client itself produces, as codec test fixtures.

Run with a python that has `tinker==0.38.0` installed (not the project's virtualenv, which pins
0.23): `python tests/compat/capture_tinker038_fixtures.py tests/backend/fixtures/tinker038`.
Requests come from the client's own encoder (`tinker.proto.request_conv`); results are built
with the client's generated message classes and checked to decode, with the client's own
decoder, to the values the trainer's JSON-shaped results carry (see the codec tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

assert tinker.__version__ == "0.38.0", tinker.__version__


def fwdbwd_request() -> bytes:
    datums = [
        types.Datum(
            model_input=types.ModelInput.from_ints([5, 9, 12]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=[9, 12, 2], dtype="int64", shape=[3]),
                "weights": types.TensorData(data=[0.0, 1.0, 0.5], dtype="float32", shape=[3]),
            },
        ),
        types.Datum(
            model_input=types.ModelInput(
                chunks=[
                    types.EncodedTextChunk(tokens=[7, 3]),
                    types.EncodedTextChunk(tokens=[300000]),
                ]
            ),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=[3, 1, 2], dtype="int64", shape=[3]),
                "logprobs": types.TensorData(data=[-1.5, -0.25, -3.0], dtype="float32", shape=[3]),
                "advantages": types.TensorData(data=[0.0, 1.0, -1.0], dtype="float32", shape=[3]),
            },
        ),
    ]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=datums,
            loss_fn="stable_reinforce",
            loss_fn_config={"kl_coeff": 0.01, "clip_low_threshold": 0.8, "mode": "token"},
        ),
        model_id="s-1:train:0",
        seq_id=7,
    )
    return bytes(forward_backward_request_to_proto(request).SerializeToString())


def forward_only_request() -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[2, 3], dtype="int64", shape=[2])},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="s-1:train:0",
        seq_id=2,
    )
    message = forward_backward_request_to_proto(request)
    message.forward_only = True  # what the client's resource layer sets for forward()
    return bytes(message.SerializeToString())


def fwdbwd_output() -> bytes:
    """Two datums of 3 and 2 tokens: logprobs and elementwise_loss, float32."""
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    message.metrics["loss:sum"] = 1.25
    record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=2)
    for name, values in {
        "logprobs": ([-0.5, -1.0, -2.0], [-0.25, -4.0]),
        "elementwise_loss": ([0.0, 1.0, 0.25], [0.0, 0.0]),
    }.items():
        arrays = [np.asarray(v, dtype=np.float32) for v in values]
        field = record.fields[name]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = np.asarray([0, 12, 20], dtype=np.int64).tobytes()
        field.dtype = pb.DTYPE_FLOAT32
    data = bytes(message.SerializeToString())
    decoded = deserialize_forward_backward_output(data)
    assert decoded.loss_fn_outputs[1]["logprobs"].tolist() == [-0.25, -4.0]
    assert decoded.metrics == {"loss:sum": 1.25}
    return data


def sample_response() -> bytes:
    message = pb.SampleResponse(prompt_cache_hit_tokens=0)
    first = message.sequences.add(stop_reason=pb.STOP_REASON_STOP)
    first.tokens = np.asarray([4, 2], dtype=np.int32).tobytes()
    first.logprobs = np.asarray([-0.5, -1.5], dtype=np.float32).tobytes()
    second = message.sequences.add(stop_reason=pb.STOP_REASON_LENGTH)
    second.tokens = np.asarray([7, 7, 9], dtype=np.int32).tobytes()
    second.logprobs = np.asarray([-2.0, -0.125, -1.0], dtype=np.float32).tobytes()
    message.prompt_logprobs = np.asarray([np.nan, -3.0, -0.75], dtype=np.float32).tobytes()
    topk = message.topk_prompt_logprobs
    topk.k, topk.length = 2, 3
    topk.token_ids = np.asarray([[0, 0], [5, 6], [8, 0]], dtype=np.int32).tobytes()
    topk.logprobs = np.asarray(
        [[-99999.0, -99999.0], [-0.5, -1.0], [-0.25, -99999.0]], dtype=np.float32
    ).tobytes()
    data = bytes(message.SerializeToString())
    decoded = deserialize_sample_response(data)
    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert decoded.prompt_logprobs == [None, -3.0, -0.75]
    return data


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fixtures = {
        "forward_backward_request.bin": fwdbwd_request(),
        "forward_only_request.bin": forward_only_request(),
        "forward_backward_output.bin": fwdbwd_output(),
        "sample_response.bin": sample_response(),
    }
    for name, data in fixtures.items():
        (out / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
