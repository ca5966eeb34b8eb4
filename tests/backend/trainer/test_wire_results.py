"""The JSON form of the trainer's typed results: exactly the objects 0.23 clients have always read
(optional answers absent rather than null, a prompt's first logprob null)."""

from __future__ import annotations

import json

from backend.trainer.errors import ServerError, UserError
from backend.trainer.futures import error_payload, failed_result
from backend.trainer.wire import (
    ForwardBackwardOutput,
    SampledSequenceWire,
    SampleResult,
    SaveForSamplerResult,
    TensorDataWire,
)


def test_a_sample_without_prompt_logprobs_has_no_such_keys() -> None:
    result = SampleResult(sequences=[SampledSequenceWire(stop_reason="stop", tokens=[3, 1])])
    assert result.wire_json() == {
        "type": "sample",
        "sequences": [{"stop_reason": "stop", "tokens": [3, 1], "logprobs": []}],
        "prompt_cache_hit_tokens": 0,
    }


def test_prompt_logprobs_keep_the_null_of_the_first_position() -> None:
    result = SampleResult(
        sequences=[],
        prompt_logprobs=[None, -1.5],
        topk_prompt_logprobs=[None, [(4, -0.25)]],
    )
    text = json.dumps(result.wire_json())
    assert '"prompt_logprobs": [null, -1.5]' in text
    assert '"topk_prompt_logprobs": [null, [[4, -0.25]]]' in text


def test_a_snapshot_answers_either_its_path_or_its_sampling_session() -> None:
    named = SaveForSamplerResult(path="snap-1").wire_json()
    ephemeral = SaveForSamplerResult(sampling_session_id="s-1:sample:0").wire_json()
    assert named == {"path": "snap-1", "type": "save_weights_for_sampler"}
    assert ephemeral == {
        "sampling_session_id": "s-1:sample:0",
        "type": "save_weights_for_sampler",
    }


def test_forward_output_keeps_integer_and_float_values_as_they_are() -> None:
    tensor = TensorDataWire(data=[1.0, 0.5], dtype="float32", shape=[2])
    ids = TensorDataWire(data=[7, 8], dtype="int64", shape=[2])
    output = ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": tensor, "ids": ids}], metrics={"loss:sum": 2.0}
    )
    text = json.dumps(output.wire_json())
    assert '"data": [1.0, 0.5]' in text and '"data": [7, 8]' in text
    assert output.wire_json()["loss_fn_output_type"] == "ArrayRecord"


def test_failures_say_whose_fault_they_are() -> None:
    assert error_payload(UserError("bad datum 3")) == {"error": "bad datum 3", "category": "user"}
    assert failed_result(ServerError("trainer gone")).category == "server"
    unexpected = failed_result(RuntimeError("boom"))
    assert unexpected.category == "server"
    assert unexpected.error == "internal error: RuntimeError: boom"


def test_encoded_results_are_the_same_json_objects() -> None:
    # The route sends `wire_json_bytes`; a client must read exactly what `wire_json` describes.
    tensor = TensorDataWire(data=[1.0, -0.5, 3], dtype="float32", shape=[3])
    results = [
        ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": tensor}], metrics={"loss:sum": 2.5}),
        SampleResult(sequences=[SampledSequenceWire(stop_reason="stop", tokens=[3, 1])]),
        SampleResult(sequences=[], prompt_logprobs=[None, -1.5], topk_prompt_logprobs=None),
        SaveForSamplerResult(path="snap-1"),
        failed_result(UserError("bad datum 3")),
    ]
    for result in results:
        assert json.loads(result.wire_json_bytes()) == result.wire_json()


def test_non_finite_floats_are_encoded_as_json_constants_not_null() -> None:
    # A null would fail the client's float fields; NaN/Infinity parse back as floats.
    tensor = TensorDataWire(data=[float("-inf"), float("nan")], dtype="float32", shape=[2])
    output = ForwardBackwardOutput(loss_fn_outputs=[{"logprobs": tensor}], metrics={"x": 1.0})
    decoded = json.loads(output.wire_json_bytes())
    low, missing = decoded["loss_fn_outputs"][0]["logprobs"]["data"]
    assert low == float("-inf") and missing != missing  # NaN is the one float unequal to itself
