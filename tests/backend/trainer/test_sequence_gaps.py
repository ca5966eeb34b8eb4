"""A refused ordered request consumes its seq id, so the client's later calls never wait for it.

Raw HTTP against the real trainer (`LocalPlatform`, the `tiny` model): seq N is sent malformed,
seq N+1 valid; N+1 must finish at once (not after the 15-minute gap timeout) and N's future must
carry the refusal. A body whose seq id cannot be read stays a plain 400.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backend import LocalPlatform
from tests.trainer_support import BATCH, FAST_TIMINGS, TrainerPlatform

PROTOBUF = "application/x-protobuf"


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with LocalPlatform(timings=FAST_TIMINGS) as platform:
        helper = TrainerPlatform(platform)
        yield helper
        helper.close()


class Trainer:
    """One job's trainer spoken to by hand: a session and one full-parameter model."""

    def __init__(self, tp: TrainerPlatform, job_id: str) -> None:
        self.http = httpx.Client(
            base_url=f"{tp.create_job(job_id)}/api/v1",
            headers={"X-API-Key": tp.api_key},
            timeout=30.0,
        )
        session_id = self.post("create_session", {})["session_id"]
        body = {"session_id": session_id, "model_seq_id": 0, "base_model": "tiny"}
        self.model_id: str = self.result(self.post("create_model", body)["request_id"])["model_id"]

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(f"/{route}", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def result(self, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            answer = self.post("retrieve_future", {"request_id": request_id})
            if answer.get("type") != "try_again":
                return answer
        raise AssertionError(f"no result for {request_id} within {timeout_s} s")

    def forward(self, seq_id: int) -> str:
        datum = BATCH[0]
        data = {
            "model_input": {
                "chunks": [{"type": "encoded_text", "tokens": datum.model_input.to_ints()}]
            },
            "loss_fn_inputs": {
                key: {"data": list(t.data), "dtype": t.dtype, "shape": t.shape}
                for key, t in datum.loss_fn_inputs.items()
            },
        }
        body = {
            "model_id": self.model_id,
            "seq_id": seq_id,
            "forward_input": {"data": [data], "loss_fn": "cross_entropy"},
        }
        request_id: str = self.post("forward", body)["request_id"]
        return request_id

    def assert_next_runs_at_once(self, seq_id: int) -> None:
        started = time.monotonic()
        answer = self.result(self.forward(seq_id), timeout_s=10.0)
        assert "loss_fn_outputs" in answer, answer
        assert time.monotonic() - started < 2.0


def _truncated_proto(model_id: str, seq_id: int) -> bytes:
    """`model_id` (field 1) and `seq_id` (field 2), then a field 3 cut off mid-way."""
    name = model_id.encode()
    return bytes([0x0A, len(name)]) + name + bytes([0x10, seq_id]) + bytes([0x1A, 0x40, 0x01])


def test_a_malformed_json_body_fails_its_own_future_and_the_next_seq_runs(
    tp: TrainerPlatform,
) -> None:
    trainer = Trainer(tp, "gap-json")
    bad = {"model_id": trainer.model_id, "seq_id": 1, "forward_input": {"data": "not a list"}}
    refused_id = trainer.post("forward", bad)["request_id"]
    trainer.assert_next_runs_at_once(2)
    refused = trainer.result(refused_id)
    assert refused["category"] == "user" and "forward_input" in refused["error"], refused


def test_an_undecodable_protobuf_body_with_readable_ids_consumes_its_seq(
    tp: TrainerPlatform,
) -> None:
    trainer = Trainer(tp, "gap-proto")
    content = _truncated_proto(trainer.model_id, 1)
    headers = {"Content-Type": PROTOBUF}
    answer = trainer.http.post("/forward_backward", content=content, headers=headers)
    assert answer.status_code == 200, answer.text
    refused_id = answer.json()["request_id"]
    trainer.assert_next_runs_at_once(2)
    refused = trainer.result(refused_id)
    assert refused["category"] == "user" and "forward_backward" in refused["error"], refused
    # A resubmission (the client retrying a lost answer) gets the same failed future.
    again = trainer.http.post("/forward_backward", content=content, headers=headers)
    assert again.json()["request_id"] == refused_id


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model_id": "s:train:0", "seq_id": 1, "forward_input": {', "application/json"),
        (b"[1, 2]", "application/json"),
        (bytes([0x1A, 0x40, 0x01]), PROTOBUF),
    ],
    ids=["truncated-json", "json-array", "proto-without-ids"],
)
def test_a_body_whose_seq_id_cannot_be_read_is_a_plain_400(
    tp: TrainerPlatform, content: bytes, content_type: str
) -> None:
    url = f"{tp.create_job(f'gap-unreadable-{len(content)}')}/api/v1/forward_backward"
    response = tp.http.post(url, content=content, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("forward_backward: ")
