"""A preempted SFT run under a real Prefect server on PostgreSQL and a process worker.

One run proves several things through the server's API: the deployment is picked up by the
worker; the trainer is preempted mid-run by a standalone `fireloop backend` fault drill; the
flow run's state history shows the failed attempt and the successful retry (run_count 2); and
its artifacts (progress, the segment metrics table, the ledger report with the verified hotload
identities) are readable back. It takes about a minute: PostgreSQL and the server start (~10 s),
the worker starts (~5 s), the flow-run process imports torch and Prefect (~10 s), and two
attempts train eight tiny steps with two hotloads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from flows.sft import sft_flow
from tests.server.runs import (
    artifacts,
    deploy,
    logs,
    state_history,
    trigger,
    wait_for_terminal,
)
from tests.server.support import (
    PlatformProcess,
    PrefectServer,
    Subprocess,
    start_worker,
)

timings = logging.getLogger("tests.server.timings")

POOL = "fireloop-pg"
PREEMPT_AT_STEP = 6  # after the step-4 checkpoint and hotload: the retry resumes from step 4
RUN_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, platform_key: str
) -> Iterator[PlatformProcess]:
    platform = PlatformProcess.start(
        tmp_path_factory.mktemp("platform") / "data", platform_key, [PREEMPT_AT_STEP]
    )
    try:
        yield platform
    finally:
        platform.stop()


@pytest.fixture(scope="module")
def worker(
    postgres_server: PrefectServer, platform_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Subprocess]:
    worker = start_worker(
        postgres_server,
        POOL,
        tmp_path_factory.mktemp("worker"),
        {"FIREWORKS_API_KEY": platform_key},
    )
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def preempted_run(
    postgres_server: PrefectServer,
    platform: PlatformProcess,
    worker: Subprocess,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[UUID, Path]:
    """Deploy SFT against the drilled platform, trigger it, wait for it to end."""
    work = tmp_path_factory.mktemp("work")
    config: dict[str, Any] = {
        "run_name": "pg-preempted",
        "max_steps": 8,
        "batch_size": 8,
        "checkpoint_every": 4,
        "hotload_every": 4,
        "eval_every": 0,
        "sample_eval": False,
        "flow_retries": 2,
        "retry_delay_s": 0,
        "platform": {"base_url": platform.base_url},  # the key comes from the worker's env
    }
    deployment_id = deploy(
        postgres_server, sft_flow, "pg-preempted", POOL, work, {"config": config}
    )
    flow_run_id = trigger(postgres_server, deployment_id)
    flow_run = wait_for_terminal(postgres_server, flow_run_id, RUN_TIMEOUT_S, worker)
    assert flow_run.state is not None
    assert flow_run.state.is_completed(), worker.log_tail()
    return flow_run_id, work / "runs" / "pg-preempted"


def test_preempted_run_retries_and_completes_in_the_server_history(
    postgres_server: PrefectServer, preempted_run: tuple[UUID, Path]
) -> None:
    flow_run_id, _ = preempted_run
    with postgres_server.client() as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.run_count == 2
    history = state_history(postgres_server, flow_run_id)
    names = [state.name for state in history]
    assert names[:3] == ["Scheduled", "Pending", "Submitting"]
    # The first attempt failed with the preemption and the server held it for a retry.
    assert names[3:] == ["Running", "AwaitingRetry", "Running", "Completed"], names
    by_name = {state.name: state.timestamp for state in history}
    timings.info(
        "postgres: worker pickup %.1f s, process start %.1f s, both attempts %.1f s",
        (by_name["Pending"] - by_name["Scheduled"]).total_seconds(),
        (history[3].timestamp - by_name["Submitting"]).total_seconds(),
        (history[-1].timestamp - history[3].timestamp).total_seconds(),
    )
    messages = [log.message for log in logs(postgres_server, flow_run_id)]
    assert any("resumed from step-4" in message for message in messages), messages[-20:]


def test_artifacts_are_readable_through_the_api(
    postgres_server: PrefectServer, preempted_run: tuple[UUID, Path]
) -> None:
    flow_run_id, run_dir = preempted_run
    by_key: dict[str, list[Any]] = {}
    for artifact in artifacts(postgres_server, flow_run_id):
        if artifact.key is not None:
            by_key.setdefault(artifact.key, []).append(artifact)

    # One progress artifact per attempt, the last at 100 %.
    progress = sorted(by_key["sft-pg-preempted-progress"], key=lambda a: a.created)
    assert len(progress) == 2
    assert float(progress[-1].data) == 100.0

    # The segment table's latest version has a row per segment of the run, ending at step 7.
    tables = sorted(by_key["sft-pg-preempted-segments"], key=lambda a: a.created)
    rows = json.loads(tables[-1].data)
    assert rows[-1]["steps"] == "4-7" and rows[-1]["checkpoint"] == "step-8", rows

    # The ledger report names the verified hotloads the ledger file recorded, and the
    # checkpoints whose snapshots they are.
    ledger_rows = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    hotloads = [row for row in ledger_rows if row["kind"] == "hotload"]
    assert [row["step"] for row in hotloads] == [4, 8]  # the step-4 hotload is not repeated
    assert all(row["verified"] for row in hotloads)
    reports = sorted(by_key["sft-pg-preempted-ledger"], key=lambda a: a.created)
    report = reports[-1].data
    for row in hotloads:
        assert f"| {row['step']} | {row['identity']} | {row['checkpoint_type']} | True |" in report
    checkpoints = {row["name"]: row for row in ledger_rows if row["kind"] == "checkpoint"}
    assert checkpoints["step-8"]["snapshot_identity"] == hotloads[-1]["identity"]
