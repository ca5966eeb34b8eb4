"""`TrainerJobManager` against the fake control plane: account resolution, idempotent create,
the readiness loop and its deadlines, resume, reconnect, checkpoints and training shapes."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from sdk import (
    AuthenticationError,
    ConfigError,
    FireworksError,
    NotFoundError,
    TrainerJobConfig,
    TrainerJobError,
    TrainerJobManager,
    TrainingShapeError,
    WaitTimeoutError,
)
from sdk.resources import TrainerJob
from tests.sdk.fakes import ACCOUNT, BASE_URL, FakeClock, FakeControlPlane, rpc_error

JOB = "job-1"
JOB_PATH = f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs/{JOB}"
GATEWAY = f"{BASE_URL}/training/v1/rlorTrainerJobs/{ACCOUNT}/{JOB}"


# -- account ------------------------------------------------------------------------------------


def test_account_is_resolved_once_and_cached(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_RUNNING")
    trainers.get(JOB)
    trainers.get(JOB)
    assert trainers.account_id == ACCOUNT
    (accounts_call,) = fake.sent("GET", "/v1/accounts")[:1]
    assert accounts_call.url.params["pageSize"] == "2"
    assert len([r for r in fake.requests if r.url.path == "/v1/accounts"]) == 1


@pytest.mark.parametrize(
    ("accounts", "match"), [([], "no account"), (["a", "b"], "more than one account")]
)
def test_account_must_be_exactly_one(
    accounts: list[str], match: str, fake: FakeControlPlane, trainers: TrainerJobManager
) -> None:
    fake.accounts = accounts
    with pytest.raises(ConfigError, match=match):
        trainers.get(JOB)


# -- create ---------------------------------------------------------------------------------------


def test_create_sends_the_request_and_stores_the_generated_id(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    config = TrainerJobConfig(base_model="accounts/fireworks/models/qwen3-8b", lora_rank=8)
    created = trainers.create(config)
    assert config.requested_job_id is not None
    assert config.requested_job_id.startswith("training-api-service-")
    assert created.job_id == config.requested_job_id
    assert created.job_name == f"accounts/{ACCOUNT}/rlorTrainerJobs/{created.job_id}"
    (post,) = fake.sent("POST", "rlorTrainerJobs")
    assert post.url.params["rlorTrainerJobId"] == created.job_id
    assert post.url.params["skipValidations"] == "true"
    assert json.loads(post.content)["trainingConfig"]["loraRank"] == 8

    again = trainers.create(config)  # a retried create reuses the id and finds the job
    assert again == created
    assert len(fake.jobs) == 1


def test_create_conflict_returns_the_existing_job(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_RUNNING")
    created = trainers.create(TrainerJobConfig(base_model="m", requested_job_id=JOB))
    assert created.job_id == JOB
    assert [r.method for r in fake.requests[1:]] == ["POST", "GET"]


def test_create_conflict_with_a_tombstone_asks_for_a_new_id(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_DELETED")
    with pytest.raises(TrainerJobError, match="use a new ID") as caught:
        trainers.create(TrainerJobConfig(base_model="m", requested_job_id=JOB))
    assert caught.value.job_id == JOB
    assert caught.value.state == "JOB_STATE_DELETED"


def test_create_validates_before_sending(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    config = TrainerJobConfig(base_model="m", auto_select_training_shape=True, node_count=2)
    with pytest.raises(ConfigError, match="node_count"):
        trainers.create(config)
    assert fake.requests == []


# -- readiness ------------------------------------------------------------------------------------


def test_create_and_wait_goes_pending_creating_running_healthy(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.job_boot_states = [
        "JOB_STATE_PENDING",
        "JOB_STATE_PENDING",
        "JOB_STATE_CREATING",
        "JOB_STATE_RUNNING",
    ]
    config = TrainerJobConfig(base_model="m", requested_job_id=JOB, max_context_length=2048)
    endpoint = trainers.create_and_wait(config, poll_interval_s=5)
    assert endpoint.job_id == JOB
    assert endpoint.job_name == f"accounts/{ACCOUNT}/rlorTrainerJobs/{JOB}"
    assert endpoint.base_url == GATEWAY
    assert endpoint.max_context_length == 2048
    assert clock.sleeps == [5, 5, 5]
    assert trainers.boot_time_s == 15
    (probe,) = fake.sent("GET", "/healthz")
    assert str(probe.url) == f"{GATEWAY}/api/v1/healthz"
    assert probe.headers["authorization"].startswith("Bearer ")
    assert probe.extensions["timeout"]["read"] == 5.0


def test_running_but_unhealthy_keeps_polling(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_job(JOB, "JOB_STATE_RUNNING").healthz_failures = 2
    endpoint = trainers.wait_for_ready(JOB, poll_interval_s=1)
    assert endpoint.base_url == GATEWAY
    assert len(fake.sent("GET", "/healthz")) == 3  # no retries inside a probe
    assert clock.sleeps == [1, 1]


def test_direct_route_is_the_fallback_when_the_gateway_is_unhealthy(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    direct = "http://10.1.2.3:8080"
    fake.add_job(JOB, "JOB_STATE_RUNNING", directRouteHandle=direct + "/").healthz_failures = 1
    fake.queue("GET /api/v1/healthz", httpx.Response(200, json={"status": "ok"}))
    endpoint = trainers.wait_for_existing(JOB)
    assert endpoint.base_url == direct


def test_failed_job_raises_with_its_status_message(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_CREATING", "JOB_STATE_FAILED", status={"message": "preempted"})
    with pytest.raises(TrainerJobError, match="preempted") as caught:
        trainers.wait_for_ready(JOB, poll_interval_s=1)
    assert caught.value.state == "JOB_STATE_FAILED"
    assert not caught.value.retryable


def test_deleted_job_raises_during_the_wait(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_CREATING", "JOB_STATE_DELETED")
    with pytest.raises(TrainerJobError, match="deleted"):
        trainers.wait_for_ready(JOB, poll_interval_s=1)


def test_stuck_creating_times_out_naming_job_state_and_seconds(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_job(JOB, "JOB_STATE_CREATING")
    with pytest.raises(WaitTimeoutError) as caught:
        trainers.wait_for_ready(JOB, poll_interval_s=5, timeout_s=12)
    error = caught.value
    assert error.last_state == "JOB_STATE_CREATING"
    assert error.waited_s == 12
    assert JOB in str(error) and "JOB_STATE_CREATING" in str(error) and "12.0s" in str(error)
    assert clock.sleeps == [5, 5, 2]  # the last sleep is clipped to the deadline


def test_pending_is_bounded_by_its_own_timeout(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_PENDING")
    with pytest.raises(WaitTimeoutError) as caught:
        trainers.wait_for_ready(JOB, poll_interval_s=10, timeout_s=5, pending_timeout_s=60)
    assert caught.value.last_state == "JOB_STATE_PENDING"
    assert caught.value.waited_s == 60  # timeout_s never started: the job was never placed


def test_placement_deadline_is_not_reset_by_a_return_to_pending(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_PENDING", "JOB_STATE_CREATING", "JOB_STATE_PENDING")
    with pytest.raises(WaitTimeoutError) as caught:
        trainers.wait_for_ready(JOB, poll_interval_s=5, timeout_s=20, pending_timeout_s=10_000)
    assert caught.value.last_state == "JOB_STATE_PENDING"
    assert caught.value.waited_s == 25  # first non-PENDING seen at t=5, deadline t=25


def test_unknown_job_propagates_not_found(trainers: TrainerJobManager) -> None:
    with pytest.raises(NotFoundError):
        trainers.wait_for_ready("missing", poll_interval_s=1)


# -- resume and reconnect ---------------------------------------------------------------------


def test_resume_posts_no_body_then_waits(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_CANCELLED")
    endpoint = trainers.resume_and_wait(JOB, poll_interval_s=1)
    assert endpoint.base_url == GATEWAY
    (resume,) = fake.sent("POST", ":resume")
    assert resume.url.path == f"{JOB_PATH}:resume"
    assert resume.content == b""
    assert resume.headers["content-type"] == "application/json"


def test_reconnect_to_a_running_job_does_not_resume(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, "JOB_STATE_RUNNING")
    assert trainers.reconnect_and_wait(JOB).base_url == GATEWAY
    assert fake.sent("POST", ":resume") == []


@pytest.mark.parametrize(
    "state", ["JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED"]
)
def test_reconnect_resumes_a_resumable_job(
    state: str, trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.add_job(JOB, state, status="preempted")
    assert trainers.reconnect_and_wait(JOB, poll_interval_s=1).job_id == JOB
    assert len(fake.sent("POST", ":resume")) == 1


def test_reconnect_waits_out_a_transitional_state(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_job(JOB, "JOB_STATE_DELETING_CLEANING_UP", "JOB_STATE_CREATING", "JOB_STATE_RUNNING")
    trainers.reconnect_and_wait(JOB, transitional_poll_s=10)
    assert clock.sleeps == [10, 10]


def test_reconnect_gives_up_on_a_stuck_transitional_state(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_job(JOB, "JOB_STATE_PENDING")
    with pytest.raises(WaitTimeoutError) as caught:
        trainers.reconnect_and_wait(JOB, max_wait_for_resumable_s=30, transitional_poll_s=10)
    assert caught.value.last_state == "JOB_STATE_PENDING"
    assert caught.value.waited_s == 30
    assert clock.sleeps == [10, 10, 10]


def test_reconnect_rides_out_a_404_blip(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_job(JOB, "JOB_STATE_FAILED")
    fake.queue(f"GET {JOB_PATH}", rpc_error(404, "not found", 5), rpc_error(404, "not found", 5))
    trainers.reconnect_and_wait(JOB, poll_interval_s=5)
    assert clock.sleeps[:2] == [5, 5]
    assert len(fake.sent("POST", ":resume")) == 1


def test_reconnect_404_for_too_long_raises_not_found(
    trainers: TrainerJobManager, clock: FakeClock
) -> None:
    with pytest.raises(NotFoundError):
        trainers.reconnect_and_wait("missing", poll_interval_s=5, max_wait_for_resumable_s=12)
    assert clock.sleeps == [5, 5, 2]


def test_reconnect_does_not_retry_an_auth_error(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.queue(f"GET {JOB_PATH}", rpc_error(401, "bad key", 16))
    with pytest.raises(AuthenticationError):
        trainers.reconnect_and_wait(JOB)
    assert clock.sleeps == []


def test_reconnect_to_a_deleted_job_fails_at_once(
    trainers: TrainerJobManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_job(JOB, "JOB_STATE_ARCHIVED")
    with pytest.raises(TrainerJobError, match="deleted"):
        trainers.reconnect_and_wait(JOB)
    assert clock.sleeps == []


# -- get, delete ------------------------------------------------------------------------------


def test_try_get_and_get(trainers: TrainerJobManager, fake: FakeControlPlane) -> None:
    assert trainers.try_get(JOB) is None
    with pytest.raises(NotFoundError, match="not found"):
        trainers.get(JOB)
    fake.add_job(JOB, "JOB_STATE_RUNNING")
    job = trainers.try_get(JOB)
    assert job is not None
    assert (job.job_id, job.state) == (JOB, "JOB_STATE_RUNNING")


def test_delete_is_best_effort(
    trainers: TrainerJobManager,
    fake: FakeControlPlane,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.add_job(JOB, "JOB_STATE_RUNNING")
    trainers.delete(JOB)
    assert fake.jobs[JOB].wire["state"] == "JOB_STATE_DELETED"

    fake.queue(f"DELETE {JOB_PATH}", *[rpc_error(500, "db down", 13)] * 10)
    with caplog.at_level(logging.WARNING, logger="sdk.trainer"):
        trainers.delete(JOB)  # does not raise
    assert "could not delete trainer job job-1" in caplog.text


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"statusMessage": "a", "message": "b"}, "a"),
        ({"message": "b"}, "b"),
        ({"status": {"message": "c"}}, "c"),
        ({"status": {"statusMessage": "d"}}, "d"),
        ({"status": {"detail": "e"}}, "e"),
        ({"status": {"details": "f"}}, "f"),
        ({"status": "g"}, "g"),
        ({"status": {"code": 0}}, None),
    ],
)
def test_status_message_fallbacks(wire: dict[str, object], expected: str | None) -> None:
    job = TrainerJob.from_api({"name": f"accounts/a/rlorTrainerJobs/{JOB}", **wire})
    assert job.status_message == expected


# -- checkpoints ---------------------------------------------------------------------------------


def _rows(count: int) -> list[dict[str, object]]:
    kinds = [
        "CHECKPOINT_TYPE_TRAINING",
        "CHECKPOINT_TYPE_INFERENCE_BASE",
        "CHECKPOINT_TYPE_TRAINING_LORA",
    ]
    return [
        {
            "name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{JOB}/checkpoints/step-{i}",
            "createTime": f"2025-01-01T00:00:{i:02d}.123456789Z"
            if i % 2
            else f"2025-01-01T00:00:{i:02d}Z",
            "checkpointType": kinds[i % 3],
            "promotable": kinds[i % 3] == "CHECKPOINT_TYPE_INFERENCE_BASE",
        }
        for i in range(count)
    ]


def test_list_checkpoints_follows_three_pages(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.checkpoints[JOB] = _rows(7)
    rows = trainers.list_checkpoints(JOB, page_size=3)
    assert [r.checkpoint_id for r in rows] == [f"step-{i}" for i in range(7)]
    pages = fake.sent("GET", "/checkpoints")
    assert [p.url.params.get("pageToken") for p in pages] == [None, "3", "6"]
    assert all(p.url.params["pageSize"] == "3" for p in pages)
    assert [r.resumable for r in rows[:3]] == [True, False, True]
    assert rows[1].promotable and not rows[0].promotable
    assert rows[1].create_time is not None and rows[1].create_time.microsecond == 123456


def test_list_checkpoints_accepts_the_alias_keys(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    path = f"GET {JOB_PATH}/checkpoints"
    first = {"rlorTrainerJobCheckpoints": _rows(2), "next_page_token": "t1"}
    fake.queue(path, httpx.Response(200, json=first), httpx.Response(200, json={}))
    assert len(trainers.list_checkpoints(JOB)) == 2


def test_list_checkpoints_stops_on_a_repeated_token(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    page = httpx.Response(200, json={"checkpoints": _rows(1), "nextPageToken": "same"})
    fake.queue(f"GET {JOB_PATH}/checkpoints", page, page, page)
    with pytest.raises(FireworksError, match="page token repeated"):
        trainers.list_checkpoints(JOB)


# -- training shapes ------------------------------------------------------------------------------

SHAPE = f"accounts/{ACCOUNT}/trainingShapes/tiny-cpu"
VERSION = {
    "name": f"{SHAPE}/versions/2",
    "snapshot": {
        "trainerImageTag": "v1.2",
        "maxSupportedContextLength": 8192,
        "nodeCount": 2,
        "deploymentShapeVersion": f"accounts/{ACCOUNT}/deploymentShapes/tiny/versions/1",
        "acceleratorType": "CPU",
        "acceleratorCount": 1,
        "trainerShardingScheme": {"pipelineParallelism": 2},
        "trainerMode": "LORA_TRAINER",
    },
}


def test_resolve_latest_validated_version(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.shape_versions[SHAPE] = [VERSION]
    profile = trainers.resolve_training_profile(SHAPE)
    (call,) = fake.sent("GET", "/versions")
    assert call.url.raw_path.decode().endswith(
        "/versions?filter=latest_validated%3Dtrue&pageSize=1"
    )
    assert profile.training_shape_version == f"{SHAPE}/versions/2"
    assert profile.training_shape == SHAPE
    assert profile.max_supported_context_length == 8192
    assert (profile.node_count, profile.pipeline_parallelism) == (2, 2)
    assert profile.deployment_shape == f"accounts/{ACCOUNT}/deploymentShapes/tiny/versions/1"
    assert profile.supports_lora
    assert profile.base_model_weight_precision == ""


def test_resolve_a_pinned_version(trainers: TrainerJobManager, fake: FakeControlPlane) -> None:
    fake.shape_versions[SHAPE] = [{"name": f"{SHAPE}/versions/1"}, VERSION]
    profile = trainers.resolve_training_profile(f"{SHAPE}/versions/1")
    assert profile.training_shape_version == f"{SHAPE}/versions/1"
    assert (profile.node_count, profile.deployment_shape, profile.supports_lora) == (1, None, False)


def test_shape_without_a_validated_version(
    trainers: TrainerJobManager, fake: FakeControlPlane
) -> None:
    fake.shape_versions[SHAPE] = []
    with pytest.raises(TrainingShapeError, match="no validated version"):
        trainers.resolve_training_profile(SHAPE)


def test_unknown_shape_gets_specific_advice(trainers: TrainerJobManager) -> None:
    with pytest.raises(NotFoundError, match="check the id") as caught:
        trainers.resolve_training_profile(f"accounts/{ACCOUNT}/trainingShapes/nope")
    assert caught.value.status_code == 404
