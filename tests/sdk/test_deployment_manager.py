"""`DeploymentManager` against the fake control plane: create-or-reuse, recreate, the readiness
wait with its completion probe, update, scale to zero and delete."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from sdk import (
    ConflictError,
    DeploymentConfig,
    DeploymentError,
    DeploymentManager,
    NotFoundError,
    WaitTimeoutError,
)
from tests.sdk.fakes import (
    ACCOUNT,
    API_KEY,
    BASE_URL,
    FakeClock,
    FakeControlPlane,
    rpc_error,
)

DEP = "dep-1"
DEP_PATH = f"/v1/accounts/{ACCOUNT}/deployments/{DEP}"
CONFIG = DeploymentConfig(deployment_id=DEP, base_model="accounts/fireworks/models/qwen3-8b")


def test_urls_default_to_the_base_url(deployments: DeploymentManager) -> None:
    assert deployments.inference_url == BASE_URL
    assert deployments.hotload_api_url == BASE_URL
    other = DeploymentManager(API_KEY, BASE_URL, "http://127.0.0.1:9/", "http://127.0.0.1:10")
    assert (other.inference_url, other.hotload_api_url) == (
        "http://127.0.0.1:9",
        "http://127.0.0.1:10",
    )


# -- create_or_get --------------------------------------------------------------------------------


def test_absent_deployment_is_created(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    info = deployments.create_or_get(CONFIG)
    assert (info.deployment_id, info.state) == (DEP, "CREATING")
    assert info.inference_model == f"accounts/{ACCOUNT}/deployments/{DEP}"
    (post,) = fake.sent("POST", "/deployments")
    assert post.url.params["deploymentId"] == DEP
    body = json.loads(post.content)
    assert body["baseModel"] == CONFIG.base_model
    assert body["enableHotLoad"] is True


def test_existing_usable_deployment_is_reused_as_is(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    fake.add_deployment(DEP, "READY")
    info = deployments.create_or_get(CONFIG)
    assert info.state == "READY"
    assert fake.sent("POST") == [] and fake.sent("DELETE") == []


@pytest.mark.parametrize("state", ["FAILED", "DELETING", "DELETED"])
def test_bad_deployment_is_deleted_then_recreated(
    state: str, deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    fake.add_deployment(DEP, state)
    info = deployments.create_or_get(CONFIG)
    assert info.state == "CREATING"
    (delete,) = fake.sent("DELETE")
    assert dict(delete.url.params) == {"ignoreChecks": "true", "hard": "true"}
    methods = [r.method for r in fake.requests if r.url.path.startswith(DEP_PATH.rsplit("/", 1)[0])]
    assert methods == ["GET", "DELETE", "GET", "POST"]  # GET, delete, poll until 404, create


def test_force_recreate_replaces_a_ready_deployment(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    fake.add_deployment(DEP, "READY")
    assert deployments.create_or_get(CONFIG, force_recreate=True).state == "CREATING"
    assert len(fake.sent("DELETE")) == 1


def test_recreate_polls_until_the_old_one_is_gone(
    deployments: DeploymentManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    def answer(state: str) -> httpx.Response:
        return httpx.Response(
            200, json={"name": f"accounts/{ACCOUNT}/deployments/{DEP}", "state": state}
        )

    # Seen FAILED, deleted, DELETING for two polls, then 404 from the stateful route: gone.
    fake.queue(f"GET {DEP_PATH}", answer("FAILED"), answer("DELETING"), answer("DELETING"))
    fake.queue(f"DELETE {DEP_PATH}", httpx.Response(200, json={}))
    assert deployments.create_or_get(CONFIG, delete_poll_interval_s=2).state == "CREATING"
    assert clock.sleeps == [2, 2]


def test_recreate_proceeds_when_the_delete_wait_times_out(
    deployments: DeploymentManager,
    fake: FakeControlPlane,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.add_deployment(DEP, "FAILED")
    fake.queue(f"DELETE {DEP_PATH}", rpc_error(400, "cannot delete yet"))
    with caplog.at_level(logging.WARNING, logger="sdk.deployment"):
        info = deployments.create_or_get(CONFIG, delete_poll_interval_s=2, delete_timeout_s=5)
    assert "could not delete deployment" in caplog.text
    assert "creating anyway" in caplog.text
    assert clock.sleeps == [2, 2, 1]
    assert info.state == "FAILED"  # the create's 409 → GET shows what is really there


def test_create_conflict_returns_the_existing_deployment(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    fake.queue(f"GET {DEP_PATH}", rpc_error(404, "not yet"))  # created by someone else meanwhile
    fake.add_deployment(DEP, "READY")
    assert deployments.create_or_get(CONFIG).state == "READY"
    assert [r.method for r in fake.requests[1:]] == ["GET", "POST", "GET"]


def test_create_conflict_then_vanished_raises_conflict(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    fake.queue(f"POST /v1/accounts/{ACCOUNT}/deployments", rpc_error(409, "exists", 6))
    with pytest.raises(ConflictError):
        deployments.create_or_get(CONFIG)


# -- wait_for_ready -------------------------------------------------------------------------------


def test_ready_returns_at_once(deployments: DeploymentManager, fake: FakeControlPlane) -> None:
    fake.add_deployment(DEP, "READY")
    assert deployments.wait_for_ready(DEP).state == "READY"
    assert fake.sent("POST", "/completions") == []
    assert deployments.boot_time_s == 0


def test_creating_and_answering_the_probe_counts_as_ready(
    deployments: DeploymentManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_deployment(DEP, "CREATING")
    fake.queue("POST /inference/v1/completions", rpc_error(503, "loading", 14))
    fake.completions_status = 200
    info = deployments.wait_for_ready(DEP, poll_interval_s=15)
    assert info.state == "READY"
    assert clock.sleeps == [15]
    assert deployments.boot_time_s == 15
    probe = fake.sent("POST", "/completions")[-1]
    assert str(probe.url) == f"{BASE_URL}/inference/v1/completions"
    assert json.loads(probe.content) == {
        "model": f"accounts/{ACCOUNT}/deployments/{DEP}",
        "prompt": [1, 2],
        "max_tokens": 4,
        "temperature": 0.0,
    }
    assert probe.headers["authorization"] == f"Bearer {API_KEY}"
    assert probe.extensions["timeout"]["read"] == 10.0


def test_probe_goes_to_the_inference_url(fake: FakeControlPlane, clock: FakeClock) -> None:
    manager = DeploymentManager(
        API_KEY,
        BASE_URL,
        inference_url="http://127.0.0.1:7000",
        transport=fake.transport(),
        sleep=clock.sleep,
        clock=clock,
    )
    fake.add_deployment(DEP, "CREATING")
    fake.completions_status = 200
    manager.wait_for_ready(DEP)
    assert fake.sent("POST", "/completions")[0].url.host == "127.0.0.1"


def test_updating_is_not_ready(
    deployments: DeploymentManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_deployment(DEP, "UPDATING", "UPDATING", "READY")
    fake.completions_status = 200
    deployments.wait_for_ready(DEP, poll_interval_s=5)
    assert clock.sleeps == [5, 5]
    assert fake.sent("POST", "/completions") == []  # the probe is only for CREATING


def test_failed_deployment_raises(deployments: DeploymentManager, fake: FakeControlPlane) -> None:
    fake.add_deployment(DEP, "CREATING", "FAILED")
    with pytest.raises(DeploymentError, match="FAILED") as caught:
        deployments.wait_for_ready(DEP, poll_interval_s=1)
    assert (caught.value.deployment_id, caught.value.state) == (DEP, "FAILED")


def test_stuck_creating_times_out(
    deployments: DeploymentManager, fake: FakeControlPlane, clock: FakeClock
) -> None:
    fake.add_deployment(DEP, "CREATING")
    with pytest.raises(WaitTimeoutError) as caught:
        deployments.wait_for_ready(DEP, timeout_s=40, poll_interval_s=15)
    assert clock.sleeps == [15, 15, 10]
    assert caught.value.last_state == "CREATING"
    assert DEP in str(caught.value) and "40.0s" in str(caught.value)


def test_missing_deployment_raises_not_found(deployments: DeploymentManager) -> None:
    with pytest.raises(NotFoundError):
        deployments.wait_for_ready(DEP)


# -- get, update, scale to zero, delete ------------------------------------------------------------


def test_get_returns_none_when_absent(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    assert deployments.get(DEP) is None
    fake.add_deployment(DEP, "READY").wire.update(
        hotLoadBucketUrl="gs://b", hot_load_trainer_job="accounts/acct/rlorTrainerJobs/j"
    )
    info = deployments.get(DEP)
    assert info is not None
    assert info.hot_load_bucket_url == "gs://b"
    assert info.hot_load_trainer_job == "accounts/acct/rlorTrainerJobs/j"


def test_update_sends_the_mask(deployments: DeploymentManager, fake: FakeControlPlane) -> None:
    fake.add_deployment(DEP, "READY")
    job = f"accounts/{ACCOUNT}/rlorTrainerJobs/j2"
    info = deployments.update(
        DEP, {"hotLoadTrainerJob": job}, ["hot_load_trainer_job", "min_replica_count"]
    )
    assert info.hot_load_trainer_job == job
    (patch,) = fake.sent("PATCH")
    assert patch.url.params["updateMask"] == "hot_load_trainer_job,min_replica_count"


def test_scale_to_zero_patches_without_a_mask(
    deployments: DeploymentManager, fake: FakeControlPlane
) -> None:
    fake.add_deployment(DEP, "READY")
    deployments.scale_to_zero(DEP)
    (patch,) = fake.sent("PATCH")
    assert "updateMask" not in patch.url.params
    assert json.loads(patch.content) == {"maxReplicaCount": 0, "minReplicaCount": 0}


def test_scale_to_zero_and_delete_never_raise(
    deployments: DeploymentManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sdk.deployment"):
        deployments.scale_to_zero(DEP)  # 404: there is nothing to scale
        deployments.delete(DEP)
    assert "could not scale deployment dep-1 to zero" in caplog.text
    assert "could not delete deployment dep-1" in caplog.text
