"""The local platform's control plane over real HTTP (docs/platform-contract.md).

Each test starts a `LocalPlatform` on a loopback port and talks to it with plain httpx, as the SDK
will: auth, trainer jobs and their state machine, the gateway's healthz, deployments, training
shapes, checkpoint rows, restarts, and a table of bad inputs that must each get a 4xx naming
the offending field or value. Time is a manual clock, so no test sleeps on a timer.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from backend import LocalPlatform, PlatformTimings, create_app
from backend.control.checkpoints import CheckpointType
from backend.control.jobs import JobRecord
from backend.gateway import active_job

if TYPE_CHECKING:
    from tests.backend.conftest import ManualClock, PlatformApi

ACCOUNT = "local"
JOBS = f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs"
DEPLOYMENTS = f"/v1/accounts/{ACCOUNT}/deployments"
SHAPES = f"/v1/accounts/{ACCOUNT}/trainingShapes"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


# ---------------------------------------------------------------- accounts and auth


def test_accounts_lists_exactly_one_account(shared_api: PlatformApi) -> None:
    response = shared_api.http.get("/v1/accounts", params={"pageSize": 2})
    assert response.status_code == 200
    accounts = response.json()["accounts"]
    assert [account["name"] for account in accounts] == ["accounts/local"]
    assert accounts[0]["state"] == "READY"


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "missing API key"),
        ({"X-Api-Key": "fw-wrong-key-123456"}, "invalid API key"),
        ({"Authorization": "Bearer fw-wrong-key-123456"}, "invalid API key"),
        ({"Authorization": "Basic fw-wrong-key-123456"}, "missing API key"),
    ],
    ids=["missing", "wrong-x-api-key", "wrong-bearer", "not-bearer"],
)
def test_requests_without_the_key_get_401_json_without_echoing_it(
    shared_api: PlatformApi, headers: dict[str, str], fragment: str
) -> None:
    platform = shared_api.platform
    for path in ("/v1/accounts", f"{JOBS}/job-1", "/no/such/route"):
        response = httpx.get(platform.base_url + path, headers=headers)
        error = shared_api.expect_error(response, 401, "UNAUTHENTICATED", fragment)
        assert error["code"] == 16
        assert "fw-wrong-key-123456" not in response.text
        assert platform.api_key not in response.text


@pytest.mark.parametrize(
    "header",
    ["X-Api-Key", "X-API-Key", "x-api-key", "Authorization", "authorization"],
)
def test_the_key_is_accepted_in_every_spelling(shared_api: PlatformApi, header: str) -> None:
    platform = shared_api.platform
    value = f"Bearer {platform.api_key}" if header.lower() == "authorization" else platform.api_key
    response = httpx.get(platform.base_url + "/v1/accounts", headers={header: value})
    assert response.status_code == 200, response.text


def test_health_answers_without_a_key_and_only_health_does(shared_api: PlatformApi) -> None:
    base_url = shared_api.platform.base_url
    health = httpx.get(base_url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    # Only the exact path and only reads: neighbours and writes still need the key.
    for method, path in (("GET", "/health/x"), ("GET", "/healthz"), ("POST", "/health")):
        response = httpx.request(method, base_url + path)
        shared_api.expect_error(response, 401, "UNAUTHENTICATED", "missing API key")


def test_a_str_data_dir_is_made_absolute_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    platform = LocalPlatform(data_dir="relative/platform", models_dir="relative/models")
    assert platform.data_dir == tmp_path.resolve() / "relative" / "platform"
    assert platform.models_dir == tmp_path.resolve() / "relative" / "models"
    monkeypatch.chdir("/")  # a later change of directory does not move it
    with platform:
        assert platform.data_dir == tmp_path.resolve() / "relative" / "platform"
        assert (platform.data_dir / "platform.sqlite3").is_file()


def test_generated_api_key_is_not_a_tinker_key(shared_api: PlatformApi) -> None:
    platform = shared_api.platform
    assert re.fullmatch(r"fw-local-[0-9a-f]{32}", platform.api_key)
    assert platform.api_key not in repr(platform)


# ---------------------------------------------------------------- trainer jobs


def test_job_advances_to_running_and_only_then_is_healthy(
    api: PlatformApi, clock: ManualClock
) -> None:
    created = api.create_job("job-1", displayName="my run", inactivityTimeout="1.5s")
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["name"] == "accounts/local/rlorTrainerJobs/job-1"
    assert job["state"] == "JOB_STATE_PENDING"
    assert RFC3339.match(job["createTime"]) and RFC3339.match(job["updateTime"])
    assert "completedTime" not in job
    # The create fields are echoed; maxContextLength defaults to the model's context.
    assert job["trainingConfig"] == {
        "baseModel": "tiny",
        "loraRank": 0,
        "learningRate": 1e-4,
        "maxContextLength": 256,
    }
    assert (job["displayName"], job["inactivityTimeout"]) == ("my run", "1.5s")
    assert job["status"] == {"code": "OK", "message": job["statusMessage"]}
    api.expect_error(api.healthz("job-1"), 503, "UNAVAILABLE", "JOB_STATE_PENDING")

    clock.advance(api.TIMINGS.job_pending_s)
    assert api.job("job-1")["state"] == "JOB_STATE_CREATING"
    api.expect_error(api.healthz("job-1"), 503, "UNAVAILABLE", "JOB_STATE_CREATING")

    clock.advance(api.TIMINGS.job_creating_s)
    assert api.job("job-1")["state"] == "JOB_STATE_RUNNING"
    health = api.healthz("job-1")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


def test_job_states_follow_the_wall_clock(tmp_path: Path) -> None:
    fast = PlatformTimings(job_pending_s=0.02, job_creating_s=0.02)
    with LocalPlatform(data_dir=tmp_path / "p", timings=fast) as platform:
        headers = {"Authorization": f"Bearer {platform.api_key}"}
        with httpx.Client(base_url=platform.base_url, headers=headers) as http:
            body = {"trainingConfig": {"baseModel": "fireloop/tiny"}}
            job_id = http.post(JOBS, json=body).json()["name"].rsplit("/", 1)[1]
            deadline = time.monotonic() + 5.0
            while http.get(f"{JOBS}/{job_id}").json()["state"] != "JOB_STATE_RUNNING":
                assert time.monotonic() < deadline, "job never reached RUNNING"
                time.sleep(0.01)
            gateway = f"/training/v1/rlorTrainerJobs/local/{job_id}/api/v1/healthz"
            assert http.get(gateway).status_code == 200


def test_missing_job_id_is_generated(shared_api: PlatformApi) -> None:
    first, second = shared_api.create_job(None).json(), shared_api.create_job(None).json()
    pattern = r"accounts/local/rlorTrainerJobs/training-api-service-[0-9a-f]{8}"
    assert re.fullmatch(pattern, first["name"]) and re.fullmatch(pattern, second["name"])
    assert first["name"] != second["name"]


def test_duplicate_job_id_is_409(api: PlatformApi) -> None:
    assert api.create_job("job-1").status_code == 200
    api.expect_error(api.create_job("job-1"), 409, "ALREADY_EXISTS", "job-1")


def test_delete_leaves_a_tombstone_whose_id_is_never_reused(
    api: PlatformApi, running_job: str
) -> None:
    lost: list[str] = []
    api.platform.state.on_job_lost(lost.append)
    deleted = api.http.delete(f"{JOBS}/{running_job}")
    assert deleted.status_code == 200
    tombstone = api.job(running_job)
    assert tombstone["state"] == "JOB_STATE_DELETED"
    assert RFC3339.match(tombstone["completedTime"])
    again = api.http.delete(f"{JOBS}/{running_job}")
    assert again.status_code == 200
    assert again.json()["updateTime"] == tombstone["updateTime"]  # a no-op
    assert lost == [running_job]  # the trainer is told once
    api.expect_error(api.create_job(running_job), 409, "ALREADY_EXISTS", running_job)
    resume = api.http.post(f"{JOBS}/{running_job}:resume")
    api.expect_error(resume, 400, "FAILED_PRECONDITION", "deleted", "new id")
    api.expect_error(api.healthz(running_job), 503, "UNAVAILABLE", "JOB_STATE_DELETED")


def test_resume_moves_a_failed_job_to_pending_before_answering(
    api: PlatformApi, clock: ManualClock, running_job: str
) -> None:
    # RUNNING: resume answers the job as it is.
    assert api.http.post(f"{JOBS}/{running_job}:resume").json()["state"] == "JOB_STATE_RUNNING"
    api.platform.preempt(running_job)
    failed = api.job(running_job)
    assert (failed["state"], failed["statusMessage"]) == ("JOB_STATE_FAILED", "preempted")
    assert "completedTime" in failed
    # No clock movement between the two calls: the transition happened inside the handler.
    resumed = api.http.post(
        f"{JOBS}/{running_job}:resume", headers={"Content-Type": "application/json"}
    )
    assert resumed.status_code == 200
    assert resumed.json()["state"] == "JOB_STATE_PENDING"
    assert api.job(running_job)["state"] == "JOB_STATE_PENDING"
    assert "completedTime" not in api.job(running_job)
    clock.advance(api.TIMINGS.job_pending_s + api.TIMINGS.job_creating_s)
    assert api.job(running_job)["state"] == "JOB_STATE_RUNNING"


def test_job_lost_hooks_run_outside_the_store_lock(api: PlatformApi, clock: ManualClock) -> None:
    # A hook (the trainer dropping its state) may wait for another thread that needs the
    # store; were hooks run under the store's lock, that thread would block until timeout.
    # The nested case: a deployment PATCH reads the linked job inside its own transaction and
    # finds it idle past its timeout, which cancels it.
    state = api.platform.state
    assert api.create_job("idle", inactivityTimeout="10s").status_code == 200
    assert api.create_deployment("dep-1").status_code == 200
    clock.advance(api.TIMINGS.job_pending_s + api.TIMINGS.job_creating_s)
    assert api.job("idle")["state"] == "JOB_STATE_RUNNING"
    seen: list[str | None] = []
    blocked: list[bool] = []

    def hook(job_id: str) -> None:
        reader = threading.Thread(target=lambda: seen.append(state.job_state(job_id)))
        reader.start()
        reader.join(timeout=2.0)
        blocked.append(reader.is_alive())

    state.on_job_lost(hook)
    clock.advance(11)
    link = {"hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/idle"}
    assert api.http.patch(f"{DEPLOYMENTS}/dep-1", json=link).status_code == 200
    assert blocked == [False]
    assert seen == ["JOB_STATE_CANCELLED"]


def test_custom_verbs_other_than_resume_are_json_errors(shared_api: PlatformApi) -> None:
    api = shared_api
    api.expect_error(api.http.post(f"{JOBS}/nobody:resume"), 404, "NOT_FOUND", "nobody")
    response = api.http.post(f"{JOBS}/job-1:explode")
    assert response.status_code in {404, 405}
    assert response.json()["error"]["message"]


def test_idle_running_job_is_cancelled_and_resumable(api: PlatformApi, clock: ManualClock) -> None:
    assert api.create_job("idle", inactivityTimeout="60s").status_code == 200
    assert api.create_job("forever", disableInactivityCleanup=True).status_code == 200
    clock.advance(api.TIMINGS.job_pending_s + api.TIMINGS.job_creating_s)
    clock.advance(50)
    api.platform.state.touch("idle")  # what the gateway does on each trainer request
    clock.advance(50)
    assert api.job("idle")["state"] == "JOB_STATE_RUNNING"
    clock.advance(11)
    cancelled = api.job("idle")
    assert cancelled["state"] == "JOB_STATE_CANCELLED"
    assert "60 s" in cancelled["statusMessage"]
    clock.advance(10 * 3600)
    assert api.job("forever")["state"] == "JOB_STATE_RUNNING"
    assert api.http.post(f"{JOBS}/idle:resume").json()["state"] == "JOB_STATE_PENDING"


def test_default_inactivity_timeout_is_one_hour(api: PlatformApi, clock: ManualClock) -> None:
    assert api.create_job("job-1", inactivityTimeout="0s").status_code == 200
    clock.advance(api.TIMINGS.job_pending_s + api.TIMINGS.job_creating_s + 3599)
    assert api.job("job-1")["state"] == "JOB_STATE_RUNNING"
    clock.advance(1)
    assert api.job("job-1")["state"] == "JOB_STATE_CANCELLED"


def test_trainer_routes_mounted_on_the_gateway_count_as_activity(
    platform: LocalPlatform, clock: ManualClock
) -> None:
    # The extension point of the next issue: a trainer router depending on `active_job`.
    trainer = APIRouter()

    @trainer.get("/whoami")
    def whoami(job: JobRecord = Depends(active_job)) -> dict[str, str]:  # noqa: B008
        return {"job": job.job_id}

    app = create_app(platform.state, trainer)
    http = TestClient(app, headers={"X-Api-Key": platform.api_key})
    body = {"trainingConfig": {"baseModel": "tiny"}, "inactivityTimeout": "10s"}
    assert http.post(JOBS, params={"rlorTrainerJobId": "j"}, json=body).status_code == 200
    url = "/training/v1/rlorTrainerJobs/local/j/api/v1/whoami"
    assert http.get(url).status_code == 503
    clock.advance(1.0)
    for _ in range(3):  # 24 s in all, never 10 s idle
        clock.advance(8.0)
        assert http.get(url).json() == {"job": "j"}
    clock.advance(10.0)
    assert http.get(f"{JOBS}/j").json()["state"] == "JOB_STATE_CANCELLED"


def test_unexpected_errors_are_500_json_without_details(api: PlatformApi) -> None:
    broken = APIRouter()

    @broken.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret-detail-xyz")

    app = create_app(api.platform.state, broken)
    headers = {"X-Api-Key": api.platform.api_key}
    http = TestClient(app, headers=headers, raise_server_exceptions=False)
    response = http.get("/training/v1/rlorTrainerJobs/local/j/api/v1/boom")
    error = api.expect_error(response, 500, "INTERNAL", "internal error")
    assert error["code"] == 13
    assert "secret-detail-xyz" not in response.text and "Traceback" not in response.text


# ---------------------------------------------------------------- restart


def test_restart_keeps_jobs_deployments_and_checkpoints(
    data_dir: Path, clock: ManualClock, make_api: Callable[[LocalPlatform], PlatformApi]
) -> None:
    timings = PlatformTimings(job_pending_s=10, job_creating_s=10, deployment_creating_s=1)
    with LocalPlatform(data_dir=data_dir, timings=timings, clock=clock) as first:
        key = first.api_key
        api = make_api(first)
        assert api.create_job("was-running").status_code == 200
        clock.advance(20)
        assert api.job("was-running")["state"] == "JOB_STATE_RUNNING"
        assert api.create_job("was-pending").status_code == 200
        assert api.create_deployment("dep-1").status_code == 200
        clock.advance(1)
        api.wait_deployment_ready("dep-1")
        first.state.record_checkpoint("was-running", "step-2", "CHECKPOINT_TYPE_TRAINING")

    with LocalPlatform(data_dir=data_dir, api_key=key, timings=timings, clock=clock) as second:
        api = make_api(second)
        lost = api.job("was-running")
        assert lost["state"] == "JOB_STATE_FAILED"
        assert lost["statusMessage"] == "trainer lost: the local platform restarted"
        assert api.job("was-pending")["state"] == "JOB_STATE_PENDING"  # its timer continues
        clock.advance(20)
        assert api.job("was-pending")["state"] == "JOB_STATE_RUNNING"
        assert api.deployment("dep-1").json()["state"] == "READY"
        rows = api.http.get(f"{JOBS}/was-running/checkpoints").json()["checkpoints"]
        assert [row["name"].rsplit("/", 1)[1] for row in rows] == ["step-2"]
        assert api.http.post(f"{JOBS}/was-running:resume").json()["state"] == "JOB_STATE_PENDING"


# ---------------------------------------------------------------- deployments


def test_deployment_lifecycle(api: PlatformApi, clock: ManualClock, running_job: str) -> None:
    link = f"accounts/local/rlorTrainerJobs/{running_job}"
    created = api.create_deployment("dep-1", hotLoadTrainerJob=link, forTraining=True)
    assert created.status_code == 200, created.text
    deployment = created.json()
    assert deployment["name"] == "accounts/local/deployments/dep-1"
    assert (deployment["state"], deployment["replicaCount"]) == ("CREATING", 0)
    assert deployment["hotLoadTrainerJob"] == link
    assert deployment["hotLoadBucketUrl"].startswith("file://")
    assert deployment["hotLoadBucketUrl"].endswith("/hotload/dep-1")
    api.expect_error(api.create_deployment("dep-1"), 409, "ALREADY_EXISTS", "dep-1")
    clock.advance(api.TIMINGS.deployment_creating_s)
    ready = api.wait_deployment_ready("dep-1")
    assert ready["replicaCount"] == 1


def test_reattaching_a_deployment_restarts_it_and_resets_the_snapshot(
    api: PlatformApi, clock: ManualClock, running_job: str
) -> None:
    state = api.platform.state
    resets: list[str] = []
    state.on_deployment_reset(resets.append)
    assert api.create_job("job-2").status_code == 200
    assert api.create_deployment("dep-1").status_code == 200
    clock.advance(api.TIMINGS.deployment_creating_s)
    state.deployments.set_served_snapshot("dep-1", "step-4-abcd1234")

    link = "accounts/local/rlorTrainerJobs/job-2"
    patched = api.http.patch(
        f"{DEPLOYMENTS}/dep-1",
        params={"updateMask": "hot_load_trainer_job,description"},
        json={"hotLoadTrainerJob": link, "description": "re-attached", "minReplicaCount": 5},
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["state"], body["hotLoadTrainerJob"]) == ("UPDATING", link)
    assert body["description"] == "re-attached"
    assert body["minReplicaCount"] == 0  # not in the mask: ignored
    assert state.deployments.served_snapshot("dep-1") == ""
    assert resets == ["dep-1"]
    clock.advance(api.TIMINGS.deployment_updating_s)
    api.wait_deployment_ready("dep-1")

    # A masked field absent from the body is cleared to its default.
    cleared = api.http.patch(f"{DEPLOYMENTS}/dep-1", params={"updateMask": "description"}, json={})
    assert "description" not in cleared.json()


def test_scale_to_zero_then_delete(api: PlatformApi, clock: ManualClock) -> None:
    resets: list[str] = []
    api.platform.state.on_deployment_reset(resets.append)
    assert api.create_deployment("dep-1", description="keep me").status_code == 200
    clock.advance(api.TIMINGS.deployment_creating_s)
    scaled = api.http.patch(
        f"{DEPLOYMENTS}/dep-1", json={"maxReplicaCount": 0, "minReplicaCount": 0}
    )
    assert scaled.status_code == 200, scaled.text
    body = scaled.json()
    assert (body["minReplicaCount"], body["maxReplicaCount"], body["replicaCount"]) == (0, 0, 0)
    assert body["description"] == "keep me"  # a mask-less PATCH changes only what it sends
    assert resets == ["dep-1"]

    deleted = api.http.delete(f"{DEPLOYMENTS}/dep-1", params={"ignoreChecks": True, "hard": True})
    assert (deleted.status_code, deleted.json()) == (200, {})
    api.expect_error(api.deployment("dep-1"), 404, "NOT_FOUND", "dep-1")
    api.expect_error(api.http.delete(f"{DEPLOYMENTS}/dep-1"), 404, "NOT_FOUND", "dep-1")
    assert resets == ["dep-1", "dep-1"]
    assert api.create_deployment("dep-1").status_code == 200  # a hard delete frees the id


# ---------------------------------------------------------------- training shapes


def test_training_shapes_s1_and_s2(shared_api: PlatformApi) -> None:
    api = shared_api
    listed = api.http.get(
        f"{SHAPES}/tiny-cpu/versions", params={"filter": "latest_validated=true", "pageSize": 1}
    )
    assert listed.status_code == 200
    (version,) = listed.json()["trainingShapeVersions"]
    assert version["name"] == "accounts/local/trainingShapes/tiny-cpu/versions/1"
    snapshot = version["snapshot"]
    assert snapshot["maxSupportedContextLength"] == 256
    assert snapshot["trainerMode"] == "POLICY_TRAINER"
    assert snapshot["trainerShardingScheme"] == {"pipelineParallelism": 1}
    assert (snapshot["nodeCount"], snapshot["acceleratorCount"]) == (1, 1)
    assert snapshot["deploymentShapeVersion"] == (
        "accounts/local/deploymentShapes/tiny-local/versions/1"
    )
    direct = api.http.get(f"{SHAPES}/smollm2-135m-cpu/versions/1").json()
    assert direct["snapshot"]["maxSupportedContextLength"] == 8192
    assert direct["snapshot"]["baseModel"] == "fireloop/smollm2-135m"
    api.expect_error(api.http.get(f"{SHAPES}/gpt-5/versions/1"), 404, "NOT_FOUND", "gpt-5")
    api.expect_error(api.http.get(f"{SHAPES}/tiny-cpu/versions/2"), 404, "NOT_FOUND", "'2'")


def test_trainer_created_on_a_shape(shared_api: PlatformApi) -> None:
    shape = "accounts/local/trainingShapes/tiny-cpu/versions/1"
    response = shared_api.http.post(
        JOBS,
        params={"rlorTrainerJobId": "shaped", "trainingShape": shape},
        json={"trainingConfig": {"baseModel": "accounts/local/models/tiny", "loraRank": 8}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["trainingConfig"]["maxContextLength"] == 256


def test_context_over_the_models_is_capped_and_echoed(shared_api: PlatformApi) -> None:
    response = shared_api.http.post(
        JOBS,
        params={"rlorTrainerJobId": "capped-context"},
        json=_job_body(maxContextLength=4096),
    )
    assert response.status_code == 200, response.text
    assert response.json()["trainingConfig"]["maxContextLength"] == 256


# ---------------------------------------------------------------- checkpoint rows


def test_checkpoint_rows_page_oldest_first(api: PlatformApi, running_job: str) -> None:
    state = api.platform.state
    kinds: list[tuple[str, CheckpointType, bool]] = [
        ("step-1", "CHECKPOINT_TYPE_TRAINING", False),
        ("step-1-sampler", "CHECKPOINT_TYPE_INFERENCE_BASE", True),
        ("step-2-sampler", "CHECKPOINT_TYPE_INFERENCE_ARC_V2", False),
        ("step-3", "CHECKPOINT_TYPE_TRAINING_LORA", False),
        ("step-3-sampler", "CHECKPOINT_TYPE_INFERENCE_LORA", True),
    ]
    for name, kind, _ in kinds:
        state.record_checkpoint(running_job, name, kind)
    # Re-recording a name refreshes its row in place (no second row, same position).
    state.record_checkpoint(running_job, "step-1", "CHECKPOINT_TYPE_TRAINING")

    rows: list[dict[str, Any]] = []
    token: str | None = ""
    pages = 0
    while token is not None:
        params = {"pageSize": 2, **({"pageToken": token} if token else {})}
        page = api.http.get(f"{JOBS}/{running_job}/checkpoints", params=params).json()
        rows += page["checkpoints"]
        token = page.get("nextPageToken")
        pages += 1
    assert pages == 3
    prefix = f"accounts/local/rlorTrainerJobs/{running_job}/checkpoints/"
    assert [(r["name"], r["checkpointType"], r["promotable"]) for r in rows] == [
        (prefix + name, kind, promotable) for name, kind, promotable in kinds
    ]
    assert all(RFC3339.match(row["createTime"]) for row in rows)

    # Rows outlive the job.
    api.http.delete(f"{JOBS}/{running_job}")
    after = api.http.get(f"{JOBS}/{running_job}/checkpoints").json()
    assert len(after["checkpoints"]) == 5 and "nextPageToken" not in after


def test_record_checkpoint_rejects_bad_calls(api: PlatformApi, running_job: str) -> None:
    state = api.platform.state
    with pytest.raises(ValueError, match="CHECKPOINT_TYPE_BOGUS"):
        state.record_checkpoint(running_job, "x", "CHECKPOINT_TYPE_BOGUS")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainer job 'ghost'"):
        state.record_checkpoint("ghost", "x", "CHECKPOINT_TYPE_TRAINING")
    with pytest.raises(ValueError, match="path segment"):
        state.record_checkpoint(running_job, "a/b", "CHECKPOINT_TYPE_TRAINING")


# ---------------------------------------------------------------- bad inputs


@dataclass(frozen=True)
class BadInput:
    """One request that must fail with `status`, naming every fragment in the message."""

    method: str
    path: str
    http_status: int
    rpc_status: str
    fragments: tuple[str, ...]
    json: Any = None
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


def _job_body(**config: Any) -> dict[str, Any]:
    return {"trainingConfig": {"baseModel": "tiny", **config}}


BAD_INPUTS: dict[str, BadInput] = {
    "unknown base model": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingConfig.baseModel", "llama-9000", "tiny", "smollm2-135m"),
        json=_job_body(baseModel="llama-9000"),
    ),
    "negative lora rank": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingConfig.loraRank", "-1"),
        json=_job_body(loraRank=-1),
    ),
    "fractional lora rank": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingConfig.loraRank", "1.5"),
        json=_job_body(loraRank=1.5),
    ),
    "zero context length": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingConfig.maxContextLength",),
        json=_job_body(maxContextLength=0),
    ),
    "inactivity timeout not a duration": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("inactivityTimeout", "'5m'"),
        json={**_job_body(), "inactivityTimeout": "5m"},
    ),
    "negative inactivity timeout": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("inactivityTimeout", "negative"),
        json={**_job_body(), "inactivityTimeout": "-5s"},
    ),
    "display name too long": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("displayName", "63"),
        json={**_job_body(), "displayName": "x" * 64},
    ),
    "unknown top-level field": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("learningRatee", "unknown field"),
        json={**_job_body(), "learningRatee": 0.1},
    ),
    "unknown nested field": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingConfig.loraRnk", "unknown field"),
        json=_job_body(loraRnk=8),
    ),
    "job id not a DNS label": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("rlorTrainerJobId", "'Bad_ID'"),
        json=_job_body(),
        params={"rlorTrainerJobId": "Bad_ID"},
    ),
    "training config missing": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingConfig", "required"),
        json={},
    ),
    "body not JSON": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("not valid JSON",),
        content=b"{not json",
    ),
    "shape of another model": BadInput(
        "POST",
        JOBS,
        400,
        "INVALID_ARGUMENT",
        ("trainingShape", "'fireloop/smollm2-135m'", "'tiny'"),
        json=_job_body(),
        params={"trainingShape": "accounts/local/trainingShapes/smollm2-135m-cpu"},
    ),
    "another account": BadInput(
        "GET",
        "/v1/accounts/other/rlorTrainerJobs/job-1",
        403,
        "PERMISSION_DENIED",
        ("'other'", "'local'"),
    ),
    "unknown job": BadInput(
        "GET",
        f"{JOBS}/no-such-job",
        404,
        "NOT_FOUND",
        ("no-such-job",),
    ),
    "unknown route": BadInput("GET", "/v1/nothing-here", 404, "NOT_FOUND", ("/v1/nothing-here",)),
    "wrong method": BadInput("PUT", f"{JOBS}/job-1", 405, "UNIMPLEMENTED", ("PUT",)),
    "deployment of an unknown model": BadInput(
        "POST",
        DEPLOYMENTS,
        400,
        "INVALID_ARGUMENT",
        ("baseModel", "llama-9000"),
        json={"baseModel": "llama-9000"},
        params={"deploymentId": "dep-2"},
    ),
    "deployment linked to another model's trainer": BadInput(
        "POST",
        DEPLOYMENTS,
        400,
        "INVALID_ARGUMENT",
        ("hotLoadTrainerJob", "'tiny'", "'smollm2-135m'"),
        json={
            "baseModel": "smollm2-135m",
            "hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/job-1",
        },
        params={"deploymentId": "dep-2"},
    ),
    "deployment linked to a missing trainer": BadInput(
        "POST",
        DEPLOYMENTS,
        400,
        "INVALID_ARGUMENT",
        ("hotLoadTrainerJob", "ghost"),
        json={"baseModel": "tiny", "hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/ghost"},
        params={"deploymentId": "dep-2"},
    ),
    "deployment without an id": BadInput(
        "POST",
        DEPLOYMENTS,
        400,
        "INVALID_ARGUMENT",
        ("deploymentId",),
        json={"baseModel": "tiny"},
    ),
    "more min than max replicas": BadInput(
        "POST",
        DEPLOYMENTS,
        400,
        "INVALID_ARGUMENT",
        ("minReplicaCount 3", "maxReplicaCount 1"),
        json={"baseModel": "tiny", "minReplicaCount": 3},
        params={"deploymentId": "dep-2"},
    ),
    "update mask naming an immutable field": BadInput(
        "PATCH",
        f"{DEPLOYMENTS}/dep-1",
        400,
        "INVALID_ARGUMENT",
        ("updateMask", "base_model"),
        json={},
        params={"updateMask": "description,base_model"},
    ),
    "patch body with an immutable field": BadInput(
        "PATCH",
        f"{DEPLOYMENTS}/dep-1",
        400,
        "INVALID_ARGUMENT",
        ("baseModel", "unknown field"),
        json={"baseModel": "smollm2-135m"},
    ),
    "patch leaving min above max": BadInput(
        "PATCH",
        f"{DEPLOYMENTS}/dep-1",
        400,
        "INVALID_ARGUMENT",
        ("minReplicaCount 2",),
        json={"minReplicaCount": 2},
    ),
    "bad page token": BadInput(
        "GET",
        f"{JOBS}/job-1/checkpoints",
        400,
        "INVALID_ARGUMENT",
        ("pageToken", "zzz"),
        params={"pageToken": "zzz"},
    ),
    "negative page size": BadInput(
        "GET",
        f"{JOBS}/job-1/checkpoints",
        400,
        "INVALID_ARGUMENT",
        ("pageSize", "-1"),
        params={"pageSize": "-1"},
    ),
    "shape filter not supported": BadInput(
        "GET",
        f"{SHAPES}/tiny-cpu/versions",
        400,
        "INVALID_ARGUMENT",
        ("filter", "state=BAD"),
        params={"filter": "state=BAD"},
    ),
}


@pytest.fixture(scope="module")
def bad_input_api(shared_api: PlatformApi) -> PlatformApi:
    """The shared platform with the job and deployment that the bad inputs refer to."""
    assert shared_api.create_job("job-1").status_code == 200
    assert shared_api.create_deployment("dep-1").status_code == 200
    return shared_api


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_gets_an_error_naming_it(bad_input_api: PlatformApi, case: BadInput) -> None:
    response = bad_input_api.http.request(
        case.method,
        case.path,
        params=case.params,
        json=case.json,
        content=case.content,
        headers={"Content-Type": "application/json"},
    )
    bad_input_api.expect_error(response, case.http_status, case.rpc_status, *case.fragments)
