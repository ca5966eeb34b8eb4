"""`promote_checkpoint` on the fake control plane: the body, the fallback for servers without
asynchronous promotion, the operation wait, and arguments refused before anything is sent."""

from __future__ import annotations

import json

import httpx
import pytest

from sdk import BadRequestError, ConfigError, FireworksError, TrainerJobManager
from tests.sdk.fakes import ACCOUNT, FakeClock, FakeControlPlane, rpc_error

CHECKPOINT = f"accounts/{ACCOUNT}/rlorTrainerJobs/job-1/checkpoints/step-4"
PROMOTE = f"POST /v1/accounts/{ACCOUNT}/checkpoints/step-4:promote"
MODEL = {"name": f"accounts/{ACCOUNT}/models/m-1", "state": "READY", "kind": "HF_BASE_MODEL"}


def _bodies(fake: FakeControlPlane) -> list[dict[str, object]]:
    return [json.loads(r.content) for r in fake.sent("POST", ":promote")]


def test_the_model_is_answered_for_a_snake_case_body(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.queue(PROMOTE, httpx.Response(200, json={"model": MODEL}))
    model = trainers.promote_checkpoint(
        name=CHECKPOINT,
        output_model_id="m-1",
        base_model="accounts/fireworks/models/qwen3-8b",
        hot_load_deployment_id="dep-1",
    )
    assert model == MODEL
    assert _bodies(fake) == [
        {
            "output_model": f"accounts/{ACCOUNT}/models/m-1",
            "trainer_job_id": f"accounts/{ACCOUNT}/rlorTrainerJobs/job-1",
            "base_model": "accounts/fireworks/models/qwen3-8b",
            "hot_load_deployment_id": f"accounts/{ACCOUNT}/deployments/dep-1",
            "async_promotion": True,
        }
    ]


def test_a_server_without_async_promotion_gets_the_request_again_without_it(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.queue(
        PROMOTE,
        rpc_error(400, "unknown field asyncPromotion"),
        httpx.Response(200, json={"model": MODEL}),
    )
    assert trainers.promote_checkpoint(name=CHECKPOINT, output_model_id="m-1") == MODEL
    first, second = _bodies(fake)
    assert first["async_promotion"] is True and "async_promotion" not in second


def test_other_bad_requests_are_not_retried(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.queue(PROMOTE, rpc_error(400, "checkpoint is a delta: not promotable"))
    with pytest.raises(BadRequestError, match="not promotable"):
        trainers.promote_checkpoint(name=CHECKPOINT, output_model_id="m-1")
    assert len(_bodies(fake)) == 1


def test_an_operation_is_polled_until_done(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    op = f"accounts/{ACCOUNT}/operations/op-1"
    fake.queue(PROMOTE, httpx.Response(200, json={"operation": {"name": op, "done": False}}))
    done = {"name": op, "done": True, "response": {"@type": "type.googleapis.com/M", **MODEL}}
    fake.queue(
        f"GET /v1/{op}",
        httpx.Response(200, json={"name": op, "done": False}),
        httpx.Response(200, json=done),
    )
    assert trainers.promote_checkpoint(name=CHECKPOINT, output_model_id="m-1") == MODEL
    assert clock.sleeps[-2:] == [10.0, 10.0]


def test_a_failed_operation_raises_its_message(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    op = f"accounts/{ACCOUNT}/operations/op-2"
    failed = {"operation": {"name": op, "done": True, "error": {"message": "disk full"}}}
    fake.queue(PROMOTE, httpx.Response(200, json=failed))
    with pytest.raises(FireworksError, match="disk full"):
        trainers.promote_checkpoint(name=CHECKPOINT, output_model_id="m-1")


def test_the_positional_form_warns(trainers: TrainerJobManager, fake: FakeControlPlane) -> None:
    fake.queue(PROMOTE, httpx.Response(200, json={"model": MODEL}))
    with pytest.warns(DeprecationWarning, match="name="):
        assert trainers.promote_checkpoint("job-1", "step-4", "m-1") == MODEL


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": CHECKPOINT, "output_model_id": ""}, "output_model_id"),
        ({"name": CHECKPOINT, "output_model_id": "Has_Caps"}, "output_model_id"),
        ({"name": CHECKPOINT, "output_model_id": "x" * 64}, "output_model_id"),
        ({"name": "step-4", "output_model_id": "m-1"}, "name must be"),
        ({"output_model_id": "m-1"}, "needs name="),
    ],
)
def test_bad_arguments_send_nothing(
    trainers: TrainerJobManager, fake: FakeControlPlane, kwargs: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        trainers.promote_checkpoint(**kwargs)
    assert _bodies(fake) == []
