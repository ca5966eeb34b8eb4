"""Fixtures for the SDK tests: a fresh fake control plane, a fake clock, managers wired to both."""

from __future__ import annotations

import pytest

from sdk import DeploymentManager, RetryPolicy, TrainerJobManager
from tests.sdk.fakes import API_KEY, BASE_URL, FakeClock, FakeControlPlane

# Small budgets so exhausted retries cost fake seconds, not real ones.
FAST_RETRY = RetryPolicy(max_wait_s=3.0, base_delay_s=1.0, max_delay_s=2.0, jitter=0.0)


@pytest.fixture
def fake() -> FakeControlPlane:
    return FakeControlPlane()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def trainers(fake: FakeControlPlane, clock: FakeClock) -> TrainerJobManager:
    return TrainerJobManager(
        API_KEY,
        BASE_URL,
        transport=fake.transport(),
        retry=FAST_RETRY,
        sleep=clock.sleep,
        clock=clock,
    )


@pytest.fixture
def deployments(fake: FakeControlPlane, clock: FakeClock) -> DeploymentManager:
    return DeploymentManager(
        API_KEY,
        BASE_URL,
        transport=fake.transport(),
        retry=FAST_RETRY,
        sleep=clock.sleep,
        clock=clock,
    )
