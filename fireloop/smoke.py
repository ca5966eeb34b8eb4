"""The smoke run: provision a trainer job and a deployment through the SDK on the embedded
local platform, check both are serving, and tear them down.

This is the README's main job until the SFT pipeline lands; it exercises the same path a
pipeline takes (create-or-reuse, readiness waits, teardown) and reports how long each took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from backend import LocalPlatform, PlatformTimings
from sdk import (
    DeploymentConfig,
    DeploymentManager,
    TrainerJobConfig,
    TrainerJobManager,
)


class SmokeStep(BaseModel):
    """One timed step of the smoke run."""

    name: str
    seconds: float
    detail: str


class SmokeReport(BaseModel):
    """What the smoke run did, in order."""

    base_url: str
    job_id: str
    deployment_id: str
    steps: list[SmokeStep]
    final_job_state: str
    deployment_after_delete: str


def run_smoke(
    *,
    base_model: str = "fireloop/tiny",
    data_dir: Path | None = None,
    on_step: Callable[[SmokeStep], None] | None = None,
) -> SmokeReport:
    """Provision, verify and tear down one trainer job and one deployment."""
    steps: list[SmokeStep] = []

    def record(name: str, started: float, detail: str) -> None:
        step = SmokeStep(name=name, seconds=time.perf_counter() - started, detail=detail)
        steps.append(step)
        if on_step is not None:
            on_step(step)

    job_id = f"smoke-{int(time.time())}"
    deployment_id = f"{job_id}-serve"
    with LocalPlatform(data_dir=data_dir, timings=PlatformTimings()) as platform:
        trainers = TrainerJobManager(api_key=platform.api_key, base_url=platform.base_url)
        deployments = DeploymentManager(api_key=platform.api_key, base_url=platform.base_url)

        started = time.perf_counter()
        endpoint = trainers.create_and_wait(
            TrainerJobConfig(base_model=base_model, requested_job_id=job_id),
            poll_interval_s=0.1,
            timeout_s=60,
        )
        record("trainer job RUNNING, healthz 200", started, endpoint.base_url)

        started = time.perf_counter()
        config = DeploymentConfig(
            deployment_id=deployment_id,
            base_model=base_model,
            hot_load_trainer_job=endpoint.job_name,
        )
        deployments.create_or_get(config)
        info = deployments.wait_for_ready(deployment_id, timeout_s=60, poll_interval_s=0.1)
        record("deployment READY", started, f"{info.name} ({info.state})")

        started = time.perf_counter()
        again = deployments.create_or_get(config)
        record("create_or_get reuses it", started, again.name)

        started = time.perf_counter()
        deployments.delete(deployment_id)
        trainers.delete(job_id)
        gone = deployments.get(deployment_id)
        job = trainers.get(job_id)
        record("teardown", started, f"job {job.state}, deployment {gone}")

        return SmokeReport(
            base_url=platform.base_url,
            job_id=job_id,
            deployment_id=deployment_id,
            steps=steps,
            final_job_state=job.state,
            deployment_after_delete="absent" if gone is None else gone.state,
        )
