"""A preempted SFT run and the project's prefect.yaml under a real Prefect server on PostgreSQL.

One run proves several things through the server's API: the deployment is picked up by a
process worker; the trainer is preempted mid-run by a standalone `fireloop backend` fault drill;
the flow run's state history shows the failed attempt and the successful retry (run_count 2);
and its artifacts (progress, the segment metrics table, the ledger report with the verified
hotload identities) are readable back. Beside it, `prefect --no-prompt deploy --all` registers
the repository's prefect.yaml as written, and a run of its nightly SFT trains to the end on the
same worker. About 75 s: PostgreSQL and the server start (~15 s), the worker starts (~5 s),
`prefect deploy` imports every flow (~10 s), each flow-run process imports torch and Prefect
(~10 s), and the runs overlap on two cores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from flows.scheduling import render_run_name
from flows.sft import sft_flow
from tests.server.runs import (
    artifacts,
    deploy,
    deploy_project,
    ledger_rows,
    logs,
    state_history,
    trigger,
    wait_for_terminal,
)
from tests.server.support import (
    REPO_ROOT,
    PlatformProcess,
    PrefectServer,
    Subprocess,
    running_platform,
    running_worker,
)

timings = logging.getLogger("tests.server.timings")
# The first test also waits for the module's servers and runs: on a loaded 2-core machine that
# took up to 2.5 minutes, so the suite's 300 s per test leaves too little headroom.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

POOL = "fireloop"  # the pool prefect.yaml names, so one worker runs both kinds of deployment
PREEMPT_AT_STEP = 6  # after the step-4 checkpoint and hotload: the retry resumes from step 4
RUN_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, platform_key: str
) -> Iterator[PlatformProcess]:
    with running_platform(
        tmp_path_factory.mktemp("platform") / "data", platform_key, [PREEMPT_AT_STEP]
    ) as platform:
        yield platform


@pytest.fixture(scope="module")
def worker(
    postgres_server: PrefectServer, platform_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Subprocess]:
    with running_worker(
        postgres_server,
        POOL,
        tmp_path_factory.mktemp("worker"),
        {"FIREWORKS_API_KEY": platform_key},
    ) as worker:
        yield worker


@dataclass(frozen=True)
class Runs:
    """The module's two flow runs, both ended, and where their files are."""

    preempted: UUID
    preempted_dir: Path
    nightly: UUID
    nightly_dir: Path


@pytest.fixture(scope="module")
def runs(
    postgres_server: PrefectServer,
    platform: PlatformProcess,
    worker: Subprocess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Runs:
    """Deploy SFT against the drilled platform and the project's prefect.yaml; trigger the
    preempted run and the nightly SFT (into a run directory of the test's), wait for both."""
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
    started = time.monotonic()
    preempted = deploy(postgres_server, sft_flow, "pg-preempted", POOL, work, {"config": config})
    preempted_id = trigger(postgres_server, preempted)
    deploying = time.monotonic()
    deploy_project(postgres_server, tmp_path_factory.mktemp("deploy-home"))
    timings.info("postgres: prefect deploy --all took %.1f s", time.monotonic() - deploying)
    nightly_config = {**_project_deployment("sft-nightly")["parameters"]["config"]}
    nightly_dir = work / "nightly"
    nightly_config["run_dir"] = str(nightly_dir)
    with postgres_server.client() as client:
        nightly = client.read_deployment_by_name("sft/sft-nightly")
    nightly_id = trigger(postgres_server, nightly.id, {"config": nightly_config})
    for flow_run_id in (preempted_id, nightly_id):
        wait_for_terminal(postgres_server, flow_run_id, RUN_TIMEOUT_S, worker)
    timings.info("postgres: both runs ended %.1f s after deploying", time.monotonic() - started)
    return Runs(preempted_id, work / "runs" / "pg-preempted", nightly_id, nightly_dir)


def _project_deployment(name: str) -> dict[str, Any]:
    project = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    found: dict[str, Any] = next(d for d in project["deployments"] if d["name"] == name)
    return found


def test_preempted_run_retries_and_completes_in_the_server_history(
    postgres_server: PrefectServer, runs: Runs
) -> None:
    flow_run_id = runs.preempted
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


def test_artifacts_are_readable_through_the_api(postgres_server: PrefectServer, runs: Runs) -> None:
    flow_run_id, run_dir = runs.preempted, runs.preempted_dir
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
    segments = json.loads(tables[-1].data)
    assert segments[-1]["steps"] == "4-7" and segments[-1]["checkpoint"] == "step-8", segments

    # The ledger report names the verified hotloads the ledger file recorded, and the
    # checkpoints whose snapshots they are.
    rows = ledger_rows(run_dir)
    hotloads = [row for row in rows if row["kind"] == "hotload"]
    assert [row["step"] for row in hotloads] == [4, 8]  # the step-4 hotload is not repeated
    assert all(row["verified"] for row in hotloads)
    reports = sorted(by_key["sft-pg-preempted-ledger"], key=lambda a: a.created)
    report = reports[-1].data
    for row in hotloads:
        assert f"| {row['step']} | {row['identity']} | {row['checkpoint_type']} | True |" in report
    checkpoints = {row["name"]: row for row in rows if row["kind"] == "checkpoint"}
    assert checkpoints["step-8"]["snapshot_identity"] == hotloads[-1]["identity"]


def test_the_projects_prefect_yaml_deploys_and_its_nightly_sft_runs(
    postgres_server: PrefectServer, runs: Runs
) -> None:
    """`prefect deploy --all` registered every deployment of prefect.yaml as written there, and
    a run of the nightly SFT, named from its start time by the template, trained to the end."""
    project = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    with postgres_server.client() as client:
        deployed = {deployment.name: deployment for deployment in client.read_deployments()}
        nightly_run = client.read_flow_run(runs.nightly)
    for declared in project["deployments"]:
        deployment = deployed[declared["name"]]
        assert deployment.work_pool_name == declared["work_pool"]["name"]
        crons = [getattr(s.schedule, "cron", None) for s in deployment.schedules]
        assert crons == [s["cron"] for s in declared.get("schedules") or []], declared["name"]
        limit = declared.get("concurrency_limit")
        if limit is not None:
            assert deployment.global_concurrency_limit is not None
            assert deployment.global_concurrency_limit.limit == limit["limit"]
    assert nightly_run.state is not None and nightly_run.state.is_completed()
    start = nightly_run.expected_start_time
    assert start is not None
    template = _project_deployment("sft-nightly")["parameters"]["config"]["run_name_template"]
    expected = render_run_name(template, recipe="sft", scheduled=start.astimezone(UTC))
    assert nightly_run.name == f"sft-{expected}"
    rows = ledger_rows(runs.nightly_dir)
    assert rows[-1]["kind"] == "run_end"
    assert (
        rows[-1]["next_step"]
        == _project_deployment("sft-nightly")["parameters"]["config"]["max_steps"]
    )
