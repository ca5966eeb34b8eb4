"""`fireloop serve` and `fireloop deployments`, run as a user runs them.

The end-to-end test serves `sft/sft-nightly` against a real Prefect server (started here, on
loopback), schedules one run three days in the past, and waits for it: the runner starts it in
a subprocess, which names the run from that scheduled time and trains the catalog's own tiny
config (8 steps) on the embedded platform. It takes 40-60 s of wall time, most of it three
Python processes importing torch and Prefect (server, `fireloop serve`, the flow run) and the
run itself; on SIGTERM the served schedules are paused.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import Deployment, FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled
from typer.testing import CliRunner

from deployments.prefect_yaml import render_prefect_yaml
from fireloop.cli import app
from tests.cli.support import cli_env, prefect_server, start_cli

TIMEOUT_S = 240


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def test_serve_without_a_server_says_how_to_get_one() -> None:
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        done = _invoke("serve")
    assert done.exit_code == 2, done.output
    assert "PREFECT_API_URL" in done.output and "prefect server start" in done.output


def test_serve_refuses_an_unknown_deployment() -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never contacted
        done = _invoke("serve", "--only", "sft-hourly")
    assert done.exit_code == 2, done.output
    assert "no deployment 'sft-hourly'" in done.output and "sft-nightly" in done.output


def test_deployments_yaml_prints_and_checks_the_rendering() -> None:
    printed = _invoke("deployments", "yaml")
    assert printed.exit_code == 0 and printed.output == render_prefect_yaml()
    assert _invoke("deployments", "yaml", "--check").exit_code == 0
    listed = _invoke("deployments", "list")
    assert listed.exit_code == 0 and "rl/rl-weekly" in listed.output


@pytest.fixture
def api_url(tmp_path: Path) -> Iterator[str]:
    with (
        prefect_server(tmp_path / "server-home") as url,
        temporary_settings({PREFECT_API_URL: url}),
    ):
        yield url


def _wait_for_deployment(name: str, log: Path) -> Deployment:
    deadline = time.monotonic() + TIMEOUT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                return client.read_deployment_by_name(name)
            except Exception:  # not registered yet: the served process is still importing
                time.sleep(0.5)
    pytest.fail(f"{name} was never served:\n{log.read_text()}")


def _wait_for_end(flow_run: FlowRun, log: Path) -> FlowRun:
    deadline = time.monotonic() + TIMEOUT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(0.5)
    pytest.fail(f"flow run {flow_run.name} never ended:\n{log.read_text()}")


def test_a_served_scheduled_run_is_named_from_its_schedule_and_trains(
    api_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    work = tmp_path / "work"  # any directory: the runner imports the flow by module
    work.mkdir()
    env = cli_env(tmp_path / "home", api_url)
    serving = start_cli(["serve", "--only", "sft-nightly"], env, work, log)
    try:
        deployment = _wait_for_deployment("sft/sft-nightly", log)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]  # type: ignore[union-attr]
        at = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=3)
        with get_client(sync_client=True) as client:
            created = client.create_flow_run_from_deployment(
                deployment.id, state=Scheduled(scheduled_time=at)
            )
        ended = _wait_for_end(created, log)
        assert ended.state is not None and ended.state.is_completed(), log.read_text()
        run_name = f"sft-nightly-{at:%Y%m%d-%H%M}"
        assert ended.name == f"sft-{run_name}"
        assert ended.empirical_policy.retries == 2  # the config's, written by the flow
        assert ended.empirical_policy.retry_delay == 5
        rows = (work / "runs" / run_name / "ledger.jsonl").read_text().splitlines()
        assert json.loads(rows[-1])["kind"] == "run_end"
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=60)
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("sft/sft-nightly").paused  # pause on shutdown
