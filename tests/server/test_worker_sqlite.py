"""Deployed SFT runs under a real Prefect server on SQLite (a laptop's set-up) and a worker.

Three deployments share the worker and their runs overlap: one on the embedded platform, which
completes; one against a standalone `fireloop backend` that preempts its trainer, with
`flow_retries=0` in the deployment's config, which fails once and is not retried (the flow
applies its config's retries, not the decorator's); and a cron deployment with a seconds field
that fires twice, its `run_name_template` giving each run its own name and run directory, both
training to the end. The module takes one to two minutes: the server migrates a fresh SQLite
database (~20 s), the worker starts (~5 s), each flow-run process imports torch and Prefect
(~10 s), and four runs share two cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from flows.sft import sft_flow
from tests.server.runs import (
    deploy,
    deployment_runs,
    ledger_rows,
    state_history,
    trigger,
    wait_for_terminal,
)
from tests.server.support import (
    PlatformProcess,
    PrefectServer,
    Subprocess,
    running_platform,
)

timings = logging.getLogger("tests.server.timings")
# The first test also waits for the module's servers and runs: on a loaded 2-core machine that
# took up to 2.5 minutes, so the suite's 300 s per test leaves too little headroom.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POOL = "fireloop-sqlite"
RUN_TIMEOUT_S = 300.0
# A short run: two segments, no deployment (no hotload, no sampled evaluation).
SMALL_RUN: dict[str, Any] = {
    "max_steps": 4,
    "batch_size": 8,
    "checkpoint_every": 2,
    "eval_every": 0,
    "sample_eval": False,
    "retry_delay_s": 0,
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployments' working directory: runs without a run_dir keep their files here."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def drilled_platform(
    tmp_path_factory: pytest.TempPathFactory, platform_key: str
) -> Iterator[PlatformProcess]:
    """A standalone platform that preempts the first job reaching its third optimizer step."""
    with running_platform(
        tmp_path_factory.mktemp("platform") / "data", platform_key, [3]
    ) as platform:
        yield platform


@dataclass(frozen=True)
class Runs:
    """The module's flow runs, all ended: two triggered, two fired by the cron schedule."""

    embedded: UUID
    no_retry: UUID
    cron: tuple[UUID, UUID]


@pytest.fixture(scope="module")
def runs(
    sqlite_server: PrefectServer,
    worker: Subprocess,
    drilled_platform: PlatformProcess,
    work: Path,
) -> Runs:
    """Deploy all three, trigger two, let the cron fire twice, and wait for the four runs: they
    share the worker and overlap, which keeps the module's wall time near one run's."""
    started = time.monotonic()
    embedded = deploy(
        sqlite_server,
        sft_flow,
        "embedded",
        POOL,
        work,
        {"config": {"run_name": "sqlite-embedded", **SMALL_RUN}},
    )
    no_retry_config = {
        "run_name": "sqlite-no-retry",
        **SMALL_RUN,
        "flow_retries": 0,
        "platform": {"base_url": drilled_platform.base_url},
    }
    no_retry = deploy(sqlite_server, sft_flow, "no-retry", POOL, work, {"config": no_retry_config})
    # A six-field cron (croniter's sixth field is seconds) fires every 5 s; once two runs have
    # left Scheduled the deployment is paused, which deletes the runs scheduled after them.
    cron = deploy(
        sqlite_server,
        sft_flow,
        "cron",
        POOL,
        work,
        {"config": {"run_name_template": "cron-{scheduled:%H%M%S}", **SMALL_RUN}},
        cron="* * * * * */5",
    )
    timings.info("sqlite: three deployments applied in %.1f s", time.monotonic() - started)
    triggered = Runs(
        embedded=trigger(sqlite_server, embedded),
        no_retry=trigger(sqlite_server, no_retry),
        cron=_two_cron_runs(sqlite_server, cron),
    )
    timings.info(
        "sqlite: two cron runs picked up %.1f s after deploying", time.monotonic() - started
    )
    for flow_run_id in (triggered.embedded, triggered.no_retry, *triggered.cron):
        wait_for_terminal(sqlite_server, flow_run_id, RUN_TIMEOUT_S, worker)
    timings.info("sqlite: all four runs ended %.1f s after deploying", time.monotonic() - started)
    return triggered


def _two_cron_runs(server: PrefectServer, deployment_id: UUID) -> tuple[UUID, UUID]:
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the cron deployment's runs were not picked up"
        runs = deployment_runs(server, deployment_id)
        picked = [run.id for run in runs if run.state is not None and not run.state.is_scheduled()]
        if len(picked) >= 2:
            with server.client() as client:
                client.pause_deployment(deployment_id)
            return picked[0], picked[1]
        time.sleep(0.5)


def test_deployed_run_completes_on_the_embedded_platform(
    sqlite_server: PrefectServer, runs: Runs, work: Path
) -> None:
    history = state_history(sqlite_server, runs.embedded)
    names = [state.name for state in history]
    assert names == ["Scheduled", "Pending", "Submitting", "Running", "Completed"], names
    by_name = {state.name: state.timestamp for state in history}
    timings.info(
        "sqlite: worker pickup %.1f s, process start %.1f s, run %.1f s",
        (by_name["Pending"] - by_name["Scheduled"]).total_seconds(),
        (by_name["Running"] - by_name["Submitting"]).total_seconds(),
        (by_name["Completed"] - by_name["Running"]).total_seconds(),
    )
    with sqlite_server.client() as client:
        flow_run = client.read_flow_run(runs.embedded)
    assert flow_run.name == "sft-sqlite-embedded" and flow_run.run_count == 1
    rows = ledger_rows(work / "runs" / "sqlite-embedded")
    assert rows[-1]["kind"] == "run_end" and rows[-1]["next_step"] == 4


def test_config_with_no_flow_retries_fails_once(
    sqlite_server: PrefectServer, runs: Runs, work: Path
) -> None:
    with sqlite_server.client() as client:
        flow_run = client.read_flow_run(runs.no_retry)
    assert flow_run.state is not None and flow_run.state.is_failed()
    assert flow_run.run_count == 1
    assert flow_run.empirical_policy.retries == 0  # written by the flow from its config
    names = [state.name for state in state_history(sqlite_server, runs.no_retry)]
    assert "AwaitingRetry" not in names and names[-2:] == ["Running", "Failed"], names
    # The ledger kept the checkpoint before the preemption, for a rerun to resume from.
    rows = ledger_rows(work / "runs" / "sqlite-no-retry")
    checkpoints = [row for row in rows if row["kind"] == "checkpoint"]
    assert [row["next_step"] for row in checkpoints] == [2]
    assert not any(row["kind"] == "run_end" for row in rows)


def test_cron_schedule_gives_two_runs_their_own_names(
    sqlite_server: PrefectServer, runs: Runs, work: Path
) -> None:
    with sqlite_server.client() as client:
        finished = [client.read_flow_run(run_id) for run_id in runs.cron]
    assert all(run.state is not None and run.state.is_completed() for run in finished)
    starts = [run.expected_start_time for run in finished]
    assert starts[0] is not None and starts[1] is not None
    assert abs(starts[1] - starts[0]) >= timedelta(seconds=5)
    # Each run is named from its own scheduled start time, so they differ and both train.
    names = [run.name for run in finished]
    assert names == [f"sft-cron-{start:%H%M%S}" for start in starts], names
    assert len(set(names)) == 2
    for name in names:
        rows = ledger_rows(work / "runs" / name.removeprefix("sft-"))
        assert rows[-1]["kind"] == "run_end" and rows[-1]["next_step"] == 4, name
