"""Fixtures for the local platform's tests: a real server on a loopback port, driven with httpx.

The platform takes an injectable clock; `clock` is a manual one, so state-machine tests move
time by hand instead of sleeping and cannot race the timers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend import LocalPlatform, PlatformTimings

ACCOUNT = "local"
JOBS = f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs"
DEPLOYMENTS = f"/v1/accounts/{ACCOUNT}/deployments"
TIMINGS = PlatformTimings(
    job_pending_s=0.2, job_creating_s=0.3, deployment_creating_s=0.3, deployment_updating_s=0.2
)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PlatformApi:
    """Thin helpers over one authenticated httpx client (plain HTTP, not the SDK).

    Test modules get one from the `api`, `shared_api` or `make_api` fixtures.
    """

    JOBS = JOBS
    DEPLOYMENTS = DEPLOYMENTS
    TIMINGS = TIMINGS

    def __init__(self, platform: LocalPlatform, client: httpx.Client) -> None:
        self.platform = platform
        self.http = client

    @staticmethod
    def expect_error(
        response: httpx.Response, http_status: int, status: str, *fragments: str
    ) -> dict[str, Any]:
        """Assert the platform's JSON error shape and a message containing every fragment."""
        assert response.status_code == http_status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error: dict[str, Any] = response.json()["error"]
        assert error["status"] == status
        assert isinstance(error["code"], int)
        assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
        assert error["details"][0]["domain"] == "fireworks.ai"
        for fragment in fragments:
            assert fragment in error["message"], (fragment, error["message"])
        return error

    def create_job(self, job_id: str | None, **fields: Any) -> httpx.Response:
        body: dict[str, Any] = {
            "serviceMode": True,
            "keepAlive": False,
            "dataset": "",
            "trainingConfig": {"baseModel": "tiny", "loraRank": 0, "learningRate": 1e-4},
            **fields,
        }
        params = {"rlorTrainerJobId": job_id} if job_id else {}
        return self.http.post(JOBS, params=params, json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"{JOBS}/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def healthz(self, job_id: str) -> httpx.Response:
        return self.http.get(f"/training/v1/rlorTrainerJobs/{ACCOUNT}/{job_id}/api/v1/healthz")

    def create_deployment(self, deployment_id: str, **fields: Any) -> httpx.Response:
        body = {"baseModel": "tiny", "enableHotLoad": True, **fields}
        return self.http.post(DEPLOYMENTS, params={"deploymentId": deployment_id}, json=body)

    def deployment(self, deployment_id: str) -> httpx.Response:
        return self.http.get(f"{DEPLOYMENTS}/{deployment_id}")

    def wait_deployment_ready(self, deployment_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Poll until READY: besides its timer, a deployment waits for its replica to load the
        base weights (in the background, real time, even under the manual clock)."""
        deadline = time.monotonic() + timeout_s
        while True:
            body: dict[str, Any] = self.deployment(deployment_id).json()
            if body["state"] == "READY":
                return body
            assert time.monotonic() < deadline, f"{deployment_id} stayed {body['state']}"
            time.sleep(0.02)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "platform"


@pytest.fixture
def platform(data_dir: Path, clock: ManualClock) -> Iterator[LocalPlatform]:
    with LocalPlatform(data_dir=data_dir, timings=TIMINGS, clock=clock) as running:
        yield running


@pytest.fixture
def make_api() -> Iterator[Callable[[LocalPlatform], PlatformApi]]:
    """Build a `PlatformApi` for any platform (tests that start their own); closes clients."""
    clients: list[httpx.Client] = []

    def make(platform: LocalPlatform) -> PlatformApi:
        headers = {"X-Api-Key": platform.api_key}
        http = httpx.Client(base_url=platform.base_url, headers=headers, timeout=10.0)
        clients.append(http)
        return PlatformApi(platform, http)

    yield make
    for http in clients:
        http.close()


@pytest.fixture
def api(platform: LocalPlatform, make_api: Callable[[LocalPlatform], PlatformApi]) -> PlatformApi:
    return make_api(platform)


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlatformApi]:
    """One platform for a whole module, for tests that only read or fail (starts cost ~0.3 s).

    Its clock is manual and never moved, so jobs created here stay PENDING.
    """
    data_dir = tmp_path_factory.mktemp("shared-platform")
    with LocalPlatform(data_dir=data_dir, timings=TIMINGS, clock=ManualClock()) as platform:
        headers = {"X-Api-Key": platform.api_key}
        with httpx.Client(base_url=platform.base_url, headers=headers, timeout=10.0) as http:
            yield PlatformApi(platform, http)


@pytest.fixture
def running_job(api: PlatformApi, clock: ManualClock) -> str:
    """A job advanced to RUNNING by the manual clock."""
    assert api.create_job("job-1").status_code == 200
    clock.advance(TIMINGS.job_pending_s + TIMINGS.job_creating_s)
    assert api.job("job-1")["state"] == "JOB_STATE_RUNNING"
    return "job-1"
