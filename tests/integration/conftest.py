"""A real local platform for SDK-level integration tests, with fast state timers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import LocalPlatform, PlatformTimings
from sdk import DeploymentManager, RetryPolicy, TrainerJobManager

FAST = PlatformTimings(
    job_pending_s=0.02, job_creating_s=0.03, deployment_creating_s=0.03, deployment_updating_s=0.02
)
# Short SDK back-off so fault-injection tests spend milliseconds, not seconds, per retry.
QUICK_RETRY = RetryPolicy(max_wait_s=30, base_delay_s=0.01, max_delay_s=0.05)
POLL = {"poll_interval_s": 0.02}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPlatform]:
    data_dir: Path = tmp_path_factory.mktemp("platform")
    with LocalPlatform(data_dir=data_dir, timings=FAST) as running:
        yield running


@pytest.fixture
def trainers(platform: LocalPlatform) -> Iterator[TrainerJobManager]:
    manager = TrainerJobManager(
        api_key=platform.api_key, base_url=platform.base_url, retry=QUICK_RETRY
    )
    yield manager
    manager.close()


@pytest.fixture
def deployments(platform: LocalPlatform) -> Iterator[DeploymentManager]:
    manager = DeploymentManager(
        api_key=platform.api_key, base_url=platform.base_url, retry=QUICK_RETRY
    )
    yield manager
    manager.close()
