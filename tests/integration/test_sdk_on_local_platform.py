"""The SDK's control-plane layer against a real `LocalPlatform` over HTTP (no fakes).

Each test drives a lifecycle a pipeline depends on: provision, preempt and reconnect, resume,
delete, deployments reused by id, scale to zero, a platform restart, and the whole lifecycle
under injected transient faults.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from backend import LocalPlatform
from sdk import (
    DeploymentConfig,
    DeploymentManager,
    TrainerJobConfig,
    TrainerJobError,
    TrainerJobManager,
)
from tests.integration.conftest import FAST, POLL, QUICK_RETRY


def _job_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _provision(trainers: TrainerJobManager, job_id: str, lora_rank: int = 0) -> str:
    config = TrainerJobConfig(
        base_model="fireloop/tiny", lora_rank=lora_rank, requested_job_id=job_id
    )
    endpoint = trainers.create_and_wait(config, timeout_s=30, **POLL)
    return endpoint.base_url


def test_create_and_wait_gives_a_running_endpoint_with_a_healthy_probe(
    platform: LocalPlatform, trainers: TrainerJobManager
) -> None:
    job_id = _job_id()
    endpoint = trainers.create_and_wait(
        TrainerJobConfig(base_model="fireloop/tiny", requested_job_id=job_id),
        timeout_s=30,
        **POLL,
    )
    assert endpoint.job_id == job_id
    assert endpoint.job_name == f"accounts/{platform.account_id}/rlorTrainerJobs/{job_id}"
    assert endpoint.max_context_length == 256  # capped at tiny's context, echoed by the job
    assert trainers.get(job_id).state == "JOB_STATE_RUNNING"
    probe = httpx.get(
        f"{endpoint.base_url}/api/v1/healthz", headers={"X-Api-Key": platform.api_key}
    )
    assert probe.status_code == 200
    assert probe.json() == {"status": "ok"}


def test_preempted_job_is_brought_back_by_reconnect_and_wait(
    platform: LocalPlatform, trainers: TrainerJobManager
) -> None:
    job_id = _job_id()
    url_before = _provision(trainers, job_id)
    platform.preempt(job_id)
    lost = trainers.get(job_id)
    assert lost.state == "JOB_STATE_FAILED"
    assert lost.status_message == "preempted"

    endpoint = trainers.reconnect_and_wait(job_id, timeout_s=30, transitional_poll_s=0.02, **POLL)

    assert endpoint.job_id == job_id
    assert endpoint.base_url == url_before
    assert trainers.get(job_id).state == "JOB_STATE_RUNNING"


def test_reconnect_to_a_running_job_does_not_resume_it(
    trainers: TrainerJobManager,
) -> None:
    job_id = _job_id()
    _provision(trainers, job_id)
    before = trainers.get(job_id)
    trainers.reconnect_and_wait(job_id, timeout_s=30, **POLL)
    after = trainers.get(job_id)
    assert after.state == "JOB_STATE_RUNNING"
    assert after.create_time == before.create_time


def test_resume_and_wait_restarts_a_failed_job(
    platform: LocalPlatform, trainers: TrainerJobManager
) -> None:
    job_id = _job_id()
    _provision(trainers, job_id)
    platform.preempt(job_id)
    endpoint = trainers.resume_and_wait(job_id, timeout_s=30, **POLL)
    assert endpoint.job_id == job_id
    assert trainers.get(job_id).state == "JOB_STATE_RUNNING"


def test_delete_leaves_a_tombstone_and_the_id_cannot_be_reused(
    trainers: TrainerJobManager,
) -> None:
    job_id = _job_id()
    _provision(trainers, job_id)
    trainers.delete(job_id)
    assert trainers.get(job_id).state == "JOB_STATE_DELETED"
    trainers.delete(job_id)  # a second delete is a no-op, never an error
    with pytest.raises(TrainerJobError, match="new ID"):
        trainers.create(TrainerJobConfig(base_model="fireloop/tiny", requested_job_id=job_id))
    with pytest.raises(TrainerJobError):
        trainers.wait_for_ready(job_id, timeout_s=5, **POLL)


def test_create_with_an_existing_id_returns_the_existing_job(
    trainers: TrainerJobManager,
) -> None:
    job_id = _job_id()
    config = TrainerJobConfig(base_model="fireloop/tiny", requested_job_id=job_id)
    first = trainers.create(config)
    second = trainers.create(config)
    assert first == second


def test_create_or_get_twice_returns_the_same_deployment(
    trainers: TrainerJobManager, deployments: DeploymentManager
) -> None:
    job_id = _job_id()
    _provision(trainers, job_id)
    config = DeploymentConfig(
        deployment_id=_job_id("serve"),
        base_model="fireloop/tiny",
        hot_load_trainer_job=job_id,
    )
    first = deployments.create_or_get(config)
    ready = deployments.wait_for_ready(config.deployment_id, timeout_s=30, **POLL)
    second = deployments.create_or_get(config)
    assert first.name == second.name == ready.name
    assert ready.state == "READY"
    assert second.hot_load_trainer_job == trainers.get(job_id).name


def test_scale_to_zero_sets_both_replica_counts(
    platform: LocalPlatform, deployments: DeploymentManager
) -> None:
    deployment_id = _job_id("serve")
    deployments.create_or_get(
        DeploymentConfig(deployment_id=deployment_id, base_model="fireloop/tiny")
    )
    deployments.wait_for_ready(deployment_id, timeout_s=30, **POLL)
    deployments.scale_to_zero(deployment_id)
    raw = httpx.get(
        f"{platform.base_url}/v1/accounts/{platform.account_id}/deployments/{deployment_id}",
        headers={"X-Api-Key": platform.api_key},
    ).json()
    assert (raw["minReplicaCount"], raw["maxReplicaCount"], raw["replicaCount"]) == (0, 0, 0)
    info = deployments.get(deployment_id)
    assert info is not None
    assert info.state == "READY"  # scaled to zero is not deleted


def test_deleted_deployment_is_gone(deployments: DeploymentManager) -> None:
    deployment_id = _job_id("serve")
    deployments.create_or_get(
        DeploymentConfig(deployment_id=deployment_id, base_model="fireloop/tiny")
    )
    deployments.delete(deployment_id)
    assert deployments.get(deployment_id) is None
    deployments.delete(deployment_id)  # best effort: deleting twice never raises


def test_a_restarted_platform_keeps_jobs_and_deployments(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("restart")
    job_id, deployment_id = _job_id(), _job_id("serve")
    with LocalPlatform(data_dir=data_dir, timings=FAST) as first:
        api_key = first.api_key
        trainers = TrainerJobManager(api_key=api_key, base_url=first.base_url, retry=QUICK_RETRY)
        deploys = DeploymentManager(api_key=api_key, base_url=first.base_url, retry=QUICK_RETRY)
        _provision(trainers, job_id)
        deploys.create_or_get(
            DeploymentConfig(
                deployment_id=deployment_id, base_model="fireloop/tiny", hot_load_trainer_job=job_id
            )
        )
        deploys.wait_for_ready(deployment_id, timeout_s=30, **POLL)

    with LocalPlatform(data_dir=data_dir, api_key=api_key, timings=FAST) as second:
        trainers = TrainerJobManager(api_key=api_key, base_url=second.base_url, retry=QUICK_RETRY)
        deploys = DeploymentManager(api_key=api_key, base_url=second.base_url, retry=QUICK_RETRY)
        job = trainers.get(job_id)
        # Its trainer process is gone with the old platform: FAILED, and resumable.
        assert job.state == "JOB_STATE_FAILED"
        assert "restarted" in (job.status_message or "")
        deployment = deploys.get(deployment_id)
        assert deployment is not None
        assert deployment.state == "READY"
        assert deployment.hot_load_trainer_job == job.name
        endpoint = trainers.reconnect_and_wait(job_id, timeout_s=30, **POLL)
        assert endpoint.job_id == job_id


def test_the_lifecycle_completes_under_ten_percent_injected_faults(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with LocalPlatform(data_dir=tmp_path_factory.mktemp("faults"), timings=FAST) as platform:
        trainers = TrainerJobManager(
            api_key=platform.api_key, base_url=platform.base_url, retry=QUICK_RETRY
        )
        deploys = DeploymentManager(
            api_key=platform.api_key, base_url=platform.base_url, retry=QUICK_RETRY
        )
        platform.inject_faults(rate=0.1, seed=7)
        done: list[tuple[str, str]] = []
        for round_ in range(4):
            job_id, deployment_id = _job_id(f"f{round_}"), _job_id(f"s{round_}")
            _provision(trainers, job_id)
            config = DeploymentConfig(
                deployment_id=deployment_id, base_model="fireloop/tiny", hot_load_trainer_job=job_id
            )
            deploys.create_or_get(config)
            assert deploys.wait_for_ready(deployment_id, timeout_s=30, **POLL).state == "READY"
            platform.preempt(job_id)
            trainers.reconnect_and_wait(job_id, timeout_s=30, transitional_poll_s=0.02, **POLL)
            deploys.delete(deployment_id)
            trainers.delete(job_id)
            done.append((job_id, deployment_id))
        platform.clear_faults()

        # The faults really happened, of both kinds, and the lifecycle absorbed them.
        stats = platform.fault_stats
        assert stats.unavailable > 0
        assert stats.dropped > 0
        for job_id, deployment_id in done:
            assert trainers.get(job_id).state == "JOB_STATE_DELETED"
            assert deploys.get(deployment_id) is None
