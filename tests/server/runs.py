"""Deployments and flow runs on a test's Prefect server, and what the server recorded of them.

Flows are deployed by module path to a process work pool and run in a working directory of the
test's own; runs are triggered, waited for with a deadline, and read back (state history,
artifacts, logs) through a client of that server alone, never the session's default API.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

from tests.server.support import REPO_ROOT, PrefectServer, Subprocess, child_env

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import Artifact, FlowRun, Log, State
    from prefect.deployments.runner import RunnerDeployment

TERMINAL_STATES: Final = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
DEPLOY_TIMEOUT_S: Final = 180.0  # imports every entrypoint's flow module


def deploy(
    server: PrefectServer,
    flow: Flow[..., Any],
    name: str,
    pool: str,
    working_dir: Path,
    parameters: Mapping[str, Any],
    **options: Any,
) -> UUID:
    """Deploy `flow` to `pool` by its module path (the worker's Python has this project
    installed, as a production image would), to run in `working_dir`: a run without a
    `run_dir` keeps its files in `working_dir/runs/<run name>`. `options` go to
    `Flow.to_deployment` (cron, schedules, concurrency_limit, tags)."""
    from prefect.types.entrypoint import EntrypointType

    working_dir.mkdir(parents=True, exist_ok=True)
    deployment: RunnerDeployment = flow.to_deployment(  # type: ignore[assignment]
        name=name,
        parameters=dict(parameters),
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"working_dir": str(working_dir)},
        **options,
    )
    with server.settings():
        deployment_id: UUID = deployment.apply(work_pool_name=pool)  # type: ignore[assignment]
    return deployment_id


def trigger(
    server: PrefectServer, deployment_id: UUID, parameters: Mapping[str, Any] | None = None
) -> UUID:
    """Create a flow run of the deployment now, without waiting for it; its id."""
    with server.client() as client:
        flow_run = client.create_flow_run_from_deployment(
            deployment_id, parameters=dict(parameters) if parameters else None
        )
    return flow_run.id


def wait_for_terminal(
    server: PrefectServer, flow_run_id: UUID, timeout_s: float, worker: Subprocess | None = None
) -> FlowRun:
    """Poll the flow run until it is Completed, Failed, Crashed or Cancelled."""
    deadline = time.monotonic() + timeout_s
    with server.client() as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.type.value in TERMINAL_STATES:
                return flow_run
            if time.monotonic() > deadline:
                hint = f"\nworker log:\n{worker.log_tail()}" if worker is not None else ""
                state = flow_run.state.name if flow_run.state else None
                raise TimeoutError(
                    f"flow run {flow_run.name} still {state} after {timeout_s:.0f} s{hint}"
                )
            time.sleep(0.5)


def state_history(server: PrefectServer, flow_run_id: UUID) -> list[State]:
    """Every state the server recorded for the flow run, oldest first."""
    with server.client() as client:
        states = client.read_flow_run_states(flow_run_id)
    return sorted(states, key=lambda state: state.timestamp)


def artifacts(server: PrefectServer, flow_run_id: UUID) -> list[Artifact]:
    """Every artifact version the flow run wrote (its tasks' included)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with server.client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def logs(server: PrefectServer, flow_run_id: UUID) -> list[Log]:
    """The flow run's log lines as the server stored them."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with server.client() as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )


def deployment_runs(server: PrefectServer, deployment_id: UUID) -> list[FlowRun]:
    """Every flow run of the deployment, scheduled ones included, oldest expected start first."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with server.client() as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    return sorted(runs, key=lambda run: str(run.expected_start_time))


def ledger_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ledger file, as written."""
    lines = (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def deploy_project(server: PrefectServer, home: Path) -> str:
    """`prefect --no-prompt deploy --all` of the repository's prefect.yaml, run from the
    repository root as its comments say, against `server`; what it printed."""
    home.mkdir(parents=True, exist_ok=True)
    env = child_env({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(home)})
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"prefect deploy --all exited with {result.returncode}:\n{output}")
    return output
