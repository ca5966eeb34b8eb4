"""Fault injection of the local platform, exercised over real HTTP.

Preemption now and at scheduled optimizer step counts (each count fires once, so a resumed run
that replays the same steps is not preempted for ever), and seeded request faults: 503 before
the handler, or a response lost after the handler ran, which clients see as a protocol error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

from backend import LocalPlatform

if TYPE_CHECKING:
    from tests.backend.conftest import ManualClock, PlatformApi

Outcome = str  # "ok", "503" or "dropped"


def _outcomes(http: httpx.Client, count: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for _ in range(count):
        try:
            response = http.get("/v1/accounts")
        except (httpx.RemoteProtocolError, httpx.ReadError):
            outcomes.append("dropped")
            continue
        if response.status_code == 503:
            error = response.json()["error"]
            assert (error["status"], error["code"]) == ("UNAVAILABLE", 14)
            outcomes.append("503")
        else:
            assert response.status_code == 200, response.text
            outcomes.append("ok")
    return outcomes


def test_preempt_fails_a_running_job_and_tells_the_trainer(
    api: PlatformApi, running_job: str
) -> None:
    lost: list[str] = []
    api.platform.state.on_job_lost(lost.append)
    api.platform.preempt(running_job)
    job = api.job(running_job)
    assert (job["state"], job["statusMessage"]) == ("JOB_STATE_FAILED", "preempted")
    assert lost == [running_job]
    assert api.platform.fault_stats.preemptions == 1
    api.expect_error(api.healthz(running_job), 503, "UNAVAILABLE", "JOB_STATE_FAILED")


def test_preempting_a_job_that_is_not_running_is_refused(api: PlatformApi) -> None:
    assert api.create_job("pending").status_code == 200
    with pytest.raises(ValueError, match="JOB_STATE_PENDING"):
        api.platform.preempt("pending")
    with pytest.raises(ValueError, match="no trainer job 'ghost'"):
        api.platform.preempt("ghost")
    assert api.job("pending")["state"] == "JOB_STATE_PENDING"


def test_scheduled_preemption_fires_once_per_step_count(
    api: PlatformApi, clock: ManualClock, running_job: str
) -> None:
    state = api.platform.state
    api.platform.schedule_preemption([2, 4])
    assert state.record_optim_step(running_job, 1) is False
    assert state.record_optim_step(running_job, 2) is True
    assert api.job(running_job)["statusMessage"] == "preempted"

    # The resumed run replays from its last checkpoint and passes step 2 again: no preemption.
    api.http.post(f"{api.JOBS}/{running_job}:resume")
    clock.advance(api.TIMINGS.job_pending_s + api.TIMINGS.job_creating_s)
    assert state.record_optim_step(running_job, 2) is False
    assert state.record_optim_step(running_job, 3) is False
    assert api.job(running_job)["state"] == "JOB_STATE_RUNNING"
    assert state.record_optim_step(running_job, 4) is True
    assert api.job(running_job)["state"] == "JOB_STATE_FAILED"
    assert state.faults.scheduled_preemptions == []


def test_clear_faults_forgets_scheduled_preemptions(api: PlatformApi, running_job: str) -> None:
    api.platform.schedule_preemption([3])
    api.platform.clear_faults()
    assert api.platform.state.record_optim_step(running_job, 3) is False
    with pytest.raises(ValueError, match="positive"):
        api.platform.schedule_preemption([0])


def test_rate_zero_never_faults(api: PlatformApi) -> None:
    api.platform.inject_faults(0.0, seed=1)
    assert _outcomes(api.http, 30) == ["ok"] * 30
    stats = api.platform.fault_stats
    assert (stats.requests_drawn, stats.injected) == (30, 0)


def test_rate_one_fails_every_request_in_both_ways(api: PlatformApi) -> None:
    api.platform.inject_faults(1.0, seed=7)
    outcomes = _outcomes(api.http, 12)
    assert "ok" not in outcomes
    assert {"503", "dropped"} <= set(outcomes)
    stats = api.platform.fault_stats
    assert stats.unavailable == outcomes.count("503")
    assert stats.dropped == outcomes.count("dropped")
    api.platform.clear_faults()
    assert _outcomes(api.http, 3) == ["ok"] * 3


def test_request_faults_are_deterministic_for_a_seed(api: PlatformApi) -> None:
    runs = []
    for seed in (11, 11, 12):
        api.platform.inject_faults(0.5, seed=seed)
        runs.append(_outcomes(api.http, 20))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert {"ok", "503", "dropped"} <= set(runs[0] + runs[2])


def test_a_dropped_response_still_ran_the_handler(api: PlatformApi) -> None:
    # The dangerous case for retried POSTs (the SDK retries them): the job exists although the
    # client saw only a broken connection, so a retry must reuse the id and get a 409.
    api.platform.inject_faults(1.0, seed=7)
    dropped: str | None = None
    for attempt in range(20):
        try:
            api.create_job(f"job-{attempt}")
        except (httpx.RemoteProtocolError, httpx.ReadError):
            dropped = f"job-{attempt}"
            break
    assert dropped is not None, "no response was dropped at rate 1.0"
    api.platform.clear_faults()
    assert api.job(dropped)["state"] == "JOB_STATE_PENDING"
    api.expect_error(api.create_job(dropped), 409, "ALREADY_EXISTS", dropped)


def test_unauthenticated_requests_do_not_draw(api: PlatformApi) -> None:
    api.platform.inject_faults(1.0, seed=3)
    response = httpx.get(api.platform.base_url + "/v1/accounts")
    assert response.status_code == 401
    assert api.platform.fault_stats.requests_drawn == 0


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_rate_must_be_a_fraction(platform: LocalPlatform, rate: float) -> None:
    with pytest.raises(ValueError, match="within"):
        platform.inject_faults(rate, seed=0)
