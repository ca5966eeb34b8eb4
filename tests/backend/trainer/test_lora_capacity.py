"""A LoRA trainer job's rank is a capacity: clients of any rank up to it share one trainer.

The published Fireworks SDK creates a LoRA job with its largest rank and then one training
client per call with a rank from 1 to it, all on the same trainer. Real local platform, the
`tiny` model, the unmodified tinker 0.23 client; raw HTTP where the exact refusal is under test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker import types

from backend import LocalPlatform
from backend.trainer.service import TrainerSettings
from tests.trainer_support import BATCH, FAST_TIMINGS, FAST_TRAINERS, TrainerPlatform

ADAM = types.AdamParams(learning_rate=5e-2)


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


_SERVICES: list[tinker.ServiceClient] = []


@pytest.fixture(autouse=True)
def _stop_heartbeats() -> Iterator[None]:
    """Stock tinker clients have no close(); their sessions heartbeat until the holder closes."""
    yield
    while _SERVICES:
        _SERVICES.pop().holder.close()  # type: ignore[no-untyped-call]


def _service(tp: TrainerPlatform, job_id: str, lora_rank: int) -> tinker.ServiceClient:
    service = tinker.ServiceClient(
        base_url=tp.create_job(job_id, lora_rank=lora_rank),
        api_key="tml-local-test",
        default_headers={"Authorization": f"Bearer {tp.api_key}"},
    )
    _SERVICES.append(service)
    return service


def _logprobs(client: tinker.TrainingClient) -> list[torch.Tensor]:
    output = client.forward(BATCH, "cross_entropy").result()
    return [torch.tensor(out["logprobs"].data) for out in output.loss_fn_outputs]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _step(client: tinker.TrainingClient) -> None:
    client.forward_backward(BATCH, "cross_entropy").result()
    client.optim_step(ADAM).result()


def test_two_lora_clients_of_different_ranks_train_independently_on_one_trainer(
    tp: TrainerPlatform,
) -> None:
    service = _service(tp, "capacity-8", lora_rank=8)
    small = service.create_lora_training_client("tiny", rank=4, seed=1)
    full = service.create_lora_training_client("tiny", rank=8, seed=2)
    base = _logprobs(small)
    assert _same(_logprobs(full), base)  # LoRA starts at the base model

    _step(small)
    trained_small = _logprobs(small)
    assert not _same(trained_small, base)
    assert _same(_logprobs(full), base)  # the other adapter did not move

    _step(full)
    assert _same(_logprobs(small), trained_small)  # and its step did not touch the first
    assert not _same(_logprobs(full), trained_small)

    rest = service.create_rest_client()
    for client, name, rank in ((small, "small", 4), (full, "full", 8)):
        path = client.save_state(name).result().path
        info = rest.get_weights_info_by_tinker_path(path).result()
        assert (info.is_lora, info.lora_rank) == (True, rank)
    # An adapter below the job's rank is served like any other.
    sampler = small.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    assert sampler.sample(BATCH[0].model_input, 1, params).result().sequences[0].tokens


def _create_model(
    tp: TrainerPlatform, job_id: str, session_id: str, seq: int, **fields: Any
) -> httpx.Response:
    body = {"session_id": session_id, "model_seq_id": seq, "base_model": "tiny", **fields}
    return tp.http.post(f"{tp.trainer_url(job_id)}/api/v1/create_model", json=body)


def _result(tp: TrainerPlatform, job_id: str, request_id: str) -> dict[str, Any]:
    """Poll a future until it has its answer (a short deadline: the tiny model is quick)."""
    deadline = time.monotonic() + 30.0
    url = f"{tp.trainer_url(job_id)}/api/v1/retrieve_future"
    while time.monotonic() < deadline:
        answer: dict[str, Any] = tp.http.post(url, json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer
    raise AssertionError(f"request {request_id} had no result after 30 s")


def _session(tp: TrainerPlatform, job_id: str) -> str:
    response = tp.http.post(f"{tp.trainer_url(job_id)}/api/v1/create_session", json={})
    assert response.status_code == 200, response.text
    session_id: str = response.json()["session_id"]
    return session_id


@pytest.mark.parametrize(
    ("job_rank", "client_rank", "fragments"),
    [
        (8, 16, ("lora_config.rank 16", "lora_rank 8", "1 <= lora_rank <= 8")),
        (0, 4, ("lora_config.rank 4", "full-parameter")),
        (8, 0, ("lora_config.rank 0", "lora_rank 8", "base-only")),
    ],
    ids=["above-capacity", "lora-on-full-job", "full-on-lora-job"],
)
def test_a_rank_the_job_cannot_hold_is_refused_at_once_with_both_ranks(
    tp: TrainerPlatform, job_rank: int, client_rank: int, fragments: tuple[str, ...]
) -> None:
    job_id = f"refuse-{job_rank}-{client_rank}"
    tp.create_job(job_id, lora_rank=job_rank)
    session_id = _session(tp, job_id)
    refused = _create_model(tp, job_id, session_id, 0, lora_config={"rank": client_rank})
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    # Nothing was registered: a fitting client under the same model seq id is accepted.
    fitting = {"lora_config": {"rank": job_rank}} if job_rank else {}
    assert _create_model(tp, job_id, session_id, 0, **fitting).status_code == 200


def test_the_stock_client_sees_the_refusal(tp: TrainerPlatform) -> None:
    service = _service(tp, "stock-refusal", lora_rank=4)
    with pytest.raises(tinker.BadRequestError, match="larger than this trainer job's lora_rank 4"):
        service.create_lora_training_client("tiny", rank=8)


def test_a_trainer_holds_at_most_max_models_and_unloading_frees_a_place(
    tp: TrainerPlatform,
) -> None:
    registry = tp.platform.state.trainers
    registry.settings = TrainerSettings(retrieve_hold_s=0.5, max_models=2)
    try:
        tp.create_job("capped", lora_rank=4)
        session_id = _session(tp, "capped")  # the trainer starts here, with the cap of 2
    finally:
        registry.settings = FAST_TRAINERS
    lora = {"lora_config": {"rank": 2}}
    for seq in (0, 1):
        assert _create_model(tp, "capped", session_id, seq, **lora).status_code == 200
    refused = _create_model(tp, "capped", session_id, 2, **lora)
    assert refused.status_code == 400
    assert "already holds 2 models" in refused.json()["error"]["message"]
    unloaded = tp.http.post(
        f"{tp.trainer_url('capped')}/api/v1/unload_model",
        json={"model_id": f"{session_id}:train:0"},
    )
    assert unloaded.status_code == 200, unloaded.text
    assert _result(tp, "capped", unloaded.json()["request_id"])["type"] == "unload_model"
    assert _create_model(tp, "capped", session_id, 2, **lora).status_code == 200
