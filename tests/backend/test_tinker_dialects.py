"""The trainer gateway's two tinker dialects on one real local platform, spoken by hand.

tinker 0.23 speaks JSON; tinker 0.38 posts forward/backward as protobuf (possibly zstd) and reads
fwd/bwd and sample results only as protobuf. The dialect is chosen per request from the headers,
so one future can be read either way and the answers must agree. Also the 0.38 additions:
`sample_sequence_ids`, `sessions/{id}/finish` and `load_weights` that creates its model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import zstandard

from backend import LocalPlatform
from backend.trainer.wire_proto import MESSAGES
from tests.trainer_support import FAST_TIMINGS, TrainerPlatform

PROTO = "application/x-protobuf"
ACCEPT_023 = "application/x-protobuf, application/json"
TOKENS = [5, 9, 12, 7, 3]


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with LocalPlatform(timings=FAST_TIMINGS) as platform:
        helper = TrainerPlatform(platform)
        yield helper
        helper.close()


class Client:
    """One tinker session on a job, with raw JSON and protobuf requests."""

    def __init__(self, tp: TrainerPlatform, job_id: str, lora_rank: int = 0) -> None:
        tp.create_job(job_id, lora_rank=lora_rank)
        self.http = httpx.Client(
            base_url=f"{tp.trainer_url(job_id)}/api/v1",
            headers={"X-API-Key": tp.api_key},
            timeout=60.0,
        )
        self.session_id = self.post("create_session", {"sdk_version": "0.38.0"})["session_id"]

    def post(self, route: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = self.http.post(f"/{route}", json=body)
        assert response.status_code == status, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def post_proto(self, body: bytes, *, zstd: bool = False, status: int = 200) -> httpx.Response:
        headers = {"Content-Type": PROTO}
        if zstd:
            body = zstandard.ZstdCompressor().compress(body)
            headers["Content-Encoding"] = "zstd"
        response = self.http.post("/forward_backward", content=body, headers=headers)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        return response

    def retrieve(self, request_id: str, accept: str) -> httpx.Response:
        while True:
            response = self.http.post(
                "/retrieve_future", json={"request_id": request_id}, headers={"Accept": accept}
            )
            assert response.status_code == 200, response.text
            if response.headers["content-type"].startswith(PROTO):
                return response
            if response.json().get("type") != "try_again":
                return response

    def create_model(self, seq: int = 0, lora_rank: int = 0) -> str:
        body: dict[str, Any] = {
            "session_id": self.session_id,
            "model_seq_id": seq,
            "base_model": "tiny",
        }
        if lora_rank:
            body["lora_config"] = {"rank": lora_rank, "seed": 0}
        future = self.post("create_model", body)
        self.retrieve(future["request_id"], "application/json")
        return str(future["model_id"])


def fwdbwd_request(model_id: str, seq_id: int, *, forward_only: bool = False) -> bytes:
    message = MESSAGES["ForwardBackwardRequest"](
        model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy", forward_only=forward_only
    )
    datum = message.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(TOKENS, dtype=np.int32).tobytes()
    targets = datum.loss_fn_inputs["target_tokens"]
    targets.dense, targets.dtype = np.asarray([*TOKENS[1:], 2], dtype=np.int64).tobytes(), 2
    targets.shape.append(len(TOKENS))
    weights = datum.loss_fn_inputs["weights"]
    weights.dense, weights.dtype = np.ones(len(TOKENS), dtype=np.float32).tobytes(), 1
    return bytes(message.SerializeToString())


def proto_logprobs(response: httpx.Response) -> list[float]:
    message = MESSAGES["ForwardBackwardOutput"]()
    message.ParseFromString(response.content)
    field = message.loss_fn_outputs[0].fields["logprobs"]
    assert np.frombuffer(field.offsets, dtype="<i8").tolist() == [0, 4 * len(TOKENS)]
    values: list[float] = np.frombuffer(field.data, dtype="<f4").tolist()
    return values


def test_one_fwdbwd_future_reads_as_protobuf_or_json_by_accept(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-fwdbwd")
    model_id = client.create_model()
    future = client.post_proto(fwdbwd_request(model_id, 1)).json()

    as_proto = client.retrieve(future["request_id"], PROTO)
    as_json = client.retrieve(future["request_id"], ACCEPT_023)

    assert as_proto.headers["content-type"] == PROTO
    assert as_json.headers["content-type"].startswith("application/json")
    expected = as_json.json()["loss_fn_outputs"][0]["logprobs"]["data"]
    assert proto_logprobs(as_proto) == pytest.approx(expected, rel=0, abs=0)
    message = MESSAGES["ForwardBackwardOutput"]()
    message.ParseFromString(as_proto.content)
    assert dict(message.metrics) == as_json.json()["metrics"]


def test_zstd_bodies_and_forward_only_requests(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-zstd")
    model_id = client.create_model()
    forward = client.post_proto(fwdbwd_request(model_id, 1, forward_only=True), zstd=True).json()
    before = proto_logprobs(client.retrieve(forward["request_id"], PROTO))
    # A forward computed no gradient: an optimizer step now changes nothing.
    step = client.post("optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {}})
    client.retrieve(step["request_id"], "application/json")
    again = client.post_proto(fwdbwd_request(model_id, 3, forward_only=True)).json()

    assert proto_logprobs(client.retrieve(again["request_id"], PROTO)) == before


def test_errors_stay_json_and_bad_bodies_are_refused_with_a_reason(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-errors")
    model_id = client.create_model()
    message = MESSAGES["ForwardBackwardRequest"]()
    message.ParseFromString(fwdbwd_request(model_id, 1))
    message.loss_fn = "stable_reinforce"
    future = client.post_proto(message.SerializeToString()).json()

    failed = client.retrieve(future["request_id"], PROTO)

    assert failed.headers["content-type"].startswith("application/json")
    assert failed.json()["category"] == "user"
    assert "stable_reinforce" in failed.json()["error"]
    garbage = client.post_proto(b"\xff\xff\xff", status=400).json()
    assert "ForwardBackwardRequest" in str(garbage)
    wrong_route = client.http.post(
        "/optim_step", content=b"\x0a\x01m", headers={"Content-Type": PROTO}
    )
    assert wrong_route.status_code == 400 and "optim_step" in wrong_route.text


def test_samples_carry_sequence_ids_and_answer_in_protobuf(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-sample")
    sampler = client.post(
        "create_sampling_session",
        {"session_id": client.session_id, "sampling_session_seq_id": 0, "base_model": "tiny"},
    )["sampling_session_id"]
    future = client.post(
        "asample",
        {
            "num_samples": 3,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
            "sampling_params": {"max_tokens": 2, "seed": 4},
            "sampling_session_id": sampler,
            "prompt_logprobs": True,
        },
    )

    ids = future["sample_sequence_ids"]
    assert len(ids) == 3 and len(set(ids)) == 3
    answer = client.retrieve(future["request_id"], PROTO)
    message = MESSAGES["SampleResponse"]()
    message.ParseFromString(answer.content)
    assert len(message.sequences) == 3
    assert all(len(np.frombuffer(s.tokens, dtype="<i4")) == 2 for s in message.sequences)
    prompt = np.frombuffer(message.prompt_logprobs, dtype="<f4")
    assert len(prompt) == len(TOKENS) and np.isnan(prompt[0]) and np.isfinite(prompt[1:]).all()


def test_finish_ends_a_known_session_only(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-finish")
    body = {"reason": {"type": "success"}, "detail": None}

    assert client.post(f"sessions/{client.session_id}/finish", body) == {}
    assert client.post("sessions/s-unknown/finish", body, status=404)["error"]


def test_load_weights_by_session_creates_the_model_once(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-load", lora_rank=4)
    source = client.create_model(lora_rank=4)
    saved = client.post("save_weights", {"model_id": source, "seq_id": 1, "path": "ckpt"})
    path = client.retrieve(saved["request_id"], "application/json").json()["path"]
    forward = client.post_proto(fwdbwd_request(source, 2, forward_only=True)).json()
    expected = proto_logprobs(client.retrieve(forward["request_id"], PROTO))
    load = {"session_id": client.session_id, "model_seq_id": 1, "path": path, "optimizer": True}

    first = client.post("load_weights", load)
    resubmitted = client.post("load_weights", load)

    assert first == resubmitted  # the same future: the model is created and loaded once
    assert first["model_id"] == f"{client.session_id}:train:1"
    assert client.retrieve(first["request_id"], "application/json").json()["path"] == path
    info = client.post("get_info", {"model_id": first["model_id"]})
    assert (info["is_lora"], info["lora_rank"]) == (True, 4)
    # The load was the model's request 0: its next ordered request is seq id 1.
    again = client.post_proto(fwdbwd_request(first["model_id"], 1, forward_only=True)).json()
    assert proto_logprobs(client.retrieve(again["request_id"], PROTO)) == expected
    missing = dict(load, model_seq_id=2, path="no-such-checkpoint")
    assert client.post("load_weights", missing, status=404)["error"]


def test_sampling_options_the_local_sampler_lacks_are_refused_by_name(tp: TrainerPlatform) -> None:
    client = Client(tp, "dialect-sample-options")
    future = client.post(
        "asample",
        {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
            "sampling_params": {"max_tokens": 1},
            "base_model": "tiny",
            "topk_sample_logprobs": 5,
            "record_stability_info": True,  # recorded only for stable_reinforce: ignored
        },
    )

    failed = client.retrieve(future["request_id"], PROTO).json()

    assert failed["category"] == "user"
    assert failed["error"].startswith("topk_sample_logprobs: not supported")
