"""The trainer gateway against the unmodified tinker 0.23.0 client and raw protocol requests.

A real local platform with the `tiny` model. Raw HTTP is used where the client would hide what
is under test: sequence ids sent out of order, resubmitted seq ids, and the answers of a trainer
that is not running. Bad inputs go through the Firetitan client, as a training loop sends them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker import types

from backend import LocalPlatform
from sdk import BadRequestError, FiretitanServiceClient, FiretitanTrainingClient, TrainerLostError
from tests.trainer_support import BATCH, FAST_TIMINGS, TINY_CONTEXT, TrainerPlatform, make_datum

ADAM = types.AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


class RawTinker:
    """The tinker protocol spoken by hand: one session, submissions and result polling."""

    def __init__(self, tp: TrainerPlatform, job_id: str) -> None:
        self.http = httpx.Client(
            base_url=f"{tp.trainer_url(job_id)}/api/v1",
            headers={"X-API-Key": tp.api_key},
            timeout=60.0,
        )
        self.session_id = self.post("create_session", {"tags": [], "sdk_version": "0.23.0"})[
            "session_id"
        ]

    def post(self, route: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = self.http.post(f"/{route}", json=body)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        answer: dict[str, Any] = response.json()
        return answer

    def result(self, request_id: str) -> dict[str, Any]:
        while True:
            answer = self.post("retrieve_future", {"request_id": request_id})
            if answer.get("type") != "try_again":
                return answer

    def create_model(self, model_seq_id: int) -> str:
        body = {"session_id": self.session_id, "model_seq_id": model_seq_id, "base_model": "tiny"}
        future = self.post("create_model", body)
        model_id: str = self.result(future["request_id"])["model_id"]
        return model_id

    def submit(self, route: str, model_id: str, seq_id: int, **fields: Any) -> str:
        future = self.post(route, {"model_id": model_id, "seq_id": seq_id, **fields})
        request_id: str = future["request_id"]
        return request_id


def _raw_batch(loss_fn_key: str = "forward_backward_input") -> dict[str, Any]:
    data = [
        {
            "model_input": {
                "chunks": [{"type": "encoded_text", "tokens": list(d.model_input.to_ints())}]
            },
            "loss_fn_inputs": {
                key: {"data": list(t.data), "dtype": t.dtype, "shape": t.shape}
                for key, t in d.loss_fn_inputs.items()
            },
        }
        for d in BATCH[:2]
    ]
    return {loss_fn_key: {"data": data, "loss_fn": "cross_entropy"}}


def _raw_ops(raw: RawTinker, model_id: str, order: list[int]) -> dict[int, str]:
    """seq 1, 2: forward_backward; 3: optim_step; 4: forward — submitted in `order`."""
    ops: dict[int, tuple[str, dict[str, Any]]] = {
        1: ("forward_backward", _raw_batch()),
        2: ("forward_backward", _raw_batch()),
        3: ("optim_step", {"adam_params": {"learning_rate": 1e-2}}),
        4: ("forward", _raw_batch("forward_input")),
    }
    return {seq: raw.submit(ops[seq][0], model_id, seq, **ops[seq][1]) for seq in order}


def test_the_stock_tinker_client_trains_and_saves(tp: TrainerPlatform) -> None:
    base_url = tp.create_job("stock-tinker", lora_rank=8)
    # An unmodified client with a tinker key; the platform's key rides in a Bearer header
    # (the platform accepts either header), so tinker's own key check passes.
    service = tinker.ServiceClient(
        base_url=base_url,
        api_key="tml-local-test",
        default_headers={"Authorization": f"Bearer {tp.api_key}"},
    )
    try:
        capabilities = service.get_server_capabilities()
        assert capabilities.supported_models[0].model_name == "tiny"
        assert capabilities.supported_models[0].max_context_length == TINY_CONTEXT
        client = service.create_lora_training_client("fireloop/tiny", rank=8, seed=3)
        losses = []
        for _ in range(5):
            fwdbwd = client.forward_backward(BATCH, "cross_entropy")
            client.optim_step(ADAM).result()
            losses.append(fwdbwd.result().metrics["loss:sum"])
        assert losses[-1] < 0.9 * losses[0], losses
        assert client.get_tokenizer().encode("abc=") == [97, 98, 99, 61]  # offline, by path
        saved = client.save_state("step-5").result()
        assert saved.path == "tinker://stock-tinker/weights/step-5"
        info = service.create_rest_client().get_weights_info_by_tinker_path(saved.path).result()
        assert (info.base_model, info.is_lora, info.lora_rank) == ("tiny", True, 8)
        sampler = client.save_weights_for_sampler("sampler-5").result()
        assert sampler.path == "tinker://stock-tinker/sampler_weights/sampler-5"
        _check_sampling(service, client, sampler.path)
        ephemeral = client.save_weights_and_get_sampling_client()
        assert ephemeral.sample(
            BATCH[0].model_input, 1, types.SamplingParams(max_tokens=2)
        ).result()
        # A new client from the saved state (weights_info, create_model, load_weights).
        restored = service.create_training_client_from_state(saved.path)
        assert _forward_logprobs(restored) == _forward_logprobs(client)
    finally:
        service.holder.close()  # type: ignore[no-untyped-call]  # stops the heartbeat


def _forward_logprobs(client: tinker.TrainingClient) -> list[list[float]]:
    output = client.forward(BATCH, "cross_entropy").result()
    return [list(out["logprobs"].data) for out in output.loss_fn_outputs]


def _check_sampling(
    service: tinker.ServiceClient, trainer: tinker.TrainingClient, model_path: str
) -> None:
    """Seeded samples are reproducible; prompt logprobs equal the trainer's at equal weights."""
    sampler = service.create_sampling_client(model_path=model_path)
    prompt = BATCH[0].model_input
    params = types.SamplingParams(max_tokens=6, seed=7, temperature=1.0, stop=[])
    first = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    again = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert all(len(s.tokens) == 6 and s.stop_reason == "length" for s in first.sequences)
    prompt_logprobs = sampler.compute_logprobs(prompt).result()
    assert prompt_logprobs[0] is None
    tokens = prompt.to_ints()
    datum = make_datum(tokens[:-1], tokens[1:], [1.0] * (len(tokens) - 1))
    forward = trainer.forward([datum], "cross_entropy").result()
    expected = torch.tensor(forward.loss_fn_outputs[0]["logprobs"].data)
    assert torch.allclose(torch.tensor(prompt_logprobs[1:]), expected, atol=1e-4)
    base = service.create_sampling_client(base_model="fireloop/tiny")
    greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
    assert len(base.sample(prompt, 1, greedy).result().sequences[0].tokens) <= 3


def test_out_of_order_seq_ids_run_in_order_and_resubmissions_run_once(tp: TrainerPlatform) -> None:
    tp.create_job("ordering")
    raw = RawTinker(tp, "ordering")
    in_order, shuffled = raw.create_model(0), raw.create_model(1)  # the same base weights
    expected = _raw_ops(raw, in_order, [1, 2, 3, 4])
    # The first chunk last, as tinker sends parallel chunks; seq 1 is what releases the rest.
    got = _raw_ops(raw, shuffled, [2, 4, 3])
    assert raw.post("retrieve_future", {"request_id": got[4]})["type"] == "try_again"
    got |= _raw_ops(raw, shuffled, [1])
    results = {seq: raw.result(request_id) for seq, request_id in got.items()}
    reference = {seq: raw.result(request_id) for seq, request_id in expected.items()}
    assert results == reference  # same logprobs and metrics, bit for bit

    # Resubmitting accepted seq ids (a client retrying after a lost answer) runs nothing.
    assert _raw_ops(raw, shuffled, [1, 2, 3]) == {seq: got[seq] for seq in (1, 2, 3)}
    check = {
        model: raw.result(raw.submit("forward", model, 5, **_raw_batch("forward_input")))
        for model in (in_order, shuffled)
    }
    assert check[in_order] == check[shuffled]
    # Unloading frees the model; what comes after fails clearly.
    raw.result(raw.post("unload_model", {"model_id": shuffled})["request_id"])
    gone = raw.result(raw.submit("forward", shuffled, 6, **_raw_batch("forward_input")))
    assert gone["category"] == "user" and "unloaded" in gone["error"]
    # An invalid seq id fails its future as a user error; it never blocks the queue.
    invalid = raw.result(raw.submit("forward", shuffled, 0, **_raw_batch("forward_input")))
    assert invalid["category"] == "user" and "seq_id" in invalid["error"]


def _expect_user_error(future: Any, *fragments: str) -> None:
    # The Firetitan client raises a user-category failure as the SDK's bad-request error.
    with pytest.raises(BadRequestError) as failure:
        future.result(timeout=60)
    assert failure.value.status_code == 400 and failure.value.retryable is False
    for fragment in fragments:
        assert fragment in str(failure.value), (fragment, str(failure.value))


def test_bad_inputs_are_user_errors_and_training_continues(tp: TrainerPlatform) -> None:
    lora_url = tp.create_job("bad-inputs-lora", lora_rank=4)
    with FiretitanServiceClient(lora_url, tp.api_key) as service:
        service.create_training_client("tiny", lora_rank=4).save_state("lora-state").result()
    with FiretitanServiceClient(tp.create_job("bad-inputs"), tp.api_key) as service:
        client = service.create_training_client("tiny")

        def still_trains() -> None:
            client.forward_backward(BATCH, "cross_entropy").result(timeout=60)
            client.optim_step(ADAM).result(timeout=60)

        cases: list[tuple[Any, tuple[str, ...]]] = [
            (lambda: client.forward_backward(BATCH, "no_such_loss"), ("unknown loss_fn",)),  # type: ignore[arg-type]
            (
                lambda: client.forward_backward(
                    [make_datum([1, 2, 3], [2, 3], [1.0, 1.0])], "cross_entropy"
                ),
                ("data[0].loss_fn_inputs.target_tokens", "shape"),
            ),
            (
                lambda: client.forward_backward(
                    [make_datum([1, 999], [2, 3], [1.0, 1.0])], "cross_entropy"
                ),
                ("vocab",),
            ),
            (
                lambda: client.forward_backward(
                    [
                        make_datum(
                            [1] * (TINY_CONTEXT + 1),
                            [1] * (TINY_CONTEXT + 1),
                            [1.0] * (TINY_CONTEXT + 1),
                        )
                    ],
                    "cross_entropy",
                ),
                ("context",),
            ),
            (lambda: client.save_state("a/b"), ("'/'",)),
            (lambda: client.save_state(".."), ("'..'",)),
            (lambda: client.load_state("never-saved"), ("no checkpoint 'never-saved'",)),
            (
                lambda: client.load_state("cross_job://bad-inputs-lora/lora-state"),
                ("LoRA", "full-parameter"),
            ),
        ]
        for submit, fragments in cases:
            _expect_user_error(submit(), *fragments)
            still_trains()
        # The seq ids of the failed requests were consumed; the client's counter kept going.
        assert client.save_state("after-errors").result().path.endswith("/after-errors")


def test_a_trainer_that_is_not_running_answers_404_json(tp: TrainerPlatform) -> None:
    tp.create_job("lost")
    raw = RawTinker(tp, "lost")
    model_id = raw.create_model(0)
    config = raw.post("client/config", {"sdk_version": "0.23.0"})
    assert config["use_pyqwest_transport"] is False and config["proto_write_fwdbwd"] is False
    assert raw.post("telemetry", {"events": []}) == {"status": "accepted"}
    assert raw.post("session_heartbeat", {"session_id": raw.session_id})["type"] == (
        "session_heartbeat"
    )
    raw.post("retrieve_future", {"request_id": "req-unknown"}, status=404)
    assert raw.http.post("/no_such_route", json={}).status_code == 404
    tp.platform.preempt("lost")
    answer = raw.post("forward", {"model_id": model_id, "seq_id": 1}, status=404)
    assert "not up" in answer["error"]["message"]
    raw.post("session_heartbeat", {"session_id": raw.session_id}, status=404)
    assert raw.http.get("/healthz").status_code == 503  # readiness probes keep their 503
    missing = httpx.post(
        f"{tp.trainer_url('never-created')}/api/v1/create_session",
        json={},
        headers={"X-API-Key": tp.api_key},
    )
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]


def test_scheduled_preemption_fires_on_the_optimizer_step_count(tp: TrainerPlatform) -> None:
    with FiretitanServiceClient(tp.create_job("scheduled"), tp.api_key) as service:
        client: FiretitanTrainingClient = service.create_training_client("tiny")
        tp.platform.schedule_preemption([2])
        client.forward_backward(BATCH, "cross_entropy").result()
        client.optim_step(ADAM).result()
        client.forward_backward(BATCH, "cross_entropy").result()
        with pytest.raises(TrainerLostError):
            client.optim_step(ADAM).result(timeout=60)
    deadline = time.monotonic() + 5
    while tp.job_state("scheduled") != "JOB_STATE_FAILED":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_logprobs_are_fp32_per_target_token(tp: TrainerPlatform) -> None:
    with FiretitanServiceClient(tp.create_job("logprobs"), tp.api_key) as service:
        client = service.create_training_client("tiny")
        output = client.forward(BATCH[:1], "cross_entropy").result()
    logprobs = torch.tensor(output.loss_fn_outputs[0]["logprobs"].data)
    targets = BATCH[0].loss_fn_inputs["target_tokens"].data
    assert logprobs.shape == (len(targets),)
    assert bool((logprobs < 0).all())
    assert output.metrics["loss:sum"] == pytest.approx(
        float(-(logprobs * torch.tensor(BATCH[0].loss_fn_inputs["weights"].data)).sum()), rel=1e-5
    )


def test_http_stays_responsive_while_the_worker_computes(
    tp: TrainerPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backend.trainer import operations

    started, release = threading.Event(), threading.Event()
    real_optim_step = operations.optim_step

    def slow_optim_step(*args: Any, **kwargs: Any) -> dict[str, Any]:
        started.set()
        release.wait(30)
        return real_optim_step(*args, **kwargs)

    monkeypatch.setattr(operations, "optim_step", slow_optim_step)
    tp.create_job("busy")
    raw = RawTinker(tp, "busy")
    model_id = raw.create_model(0)
    raw.submit("forward_backward", model_id, 1, **_raw_batch())
    busy = raw.submit("optim_step", model_id, 2, adam_params={"learning_rate": 1e-2})
    assert started.wait(30)
    try:
        began = time.monotonic()
        assert raw.http.get("/healthz").status_code == 200
        raw.post("session_heartbeat", {"session_id": raw.session_id})
        raw.http.get("/get_server_capabilities").raise_for_status()
        assert raw.post("retrieve_future", {"request_id": busy})["type"] == "try_again"
        assert time.monotonic() - began < 5  # the hold (0.5 s) dominates; no compute waits
    finally:
        release.set()
    assert "grad_norm:mean" in raw.result(busy)["metrics"]
