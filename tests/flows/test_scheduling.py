"""Scheduled runs: run names from the scheduled start time, the config's flow retries applied by
the flow itself, and resource ids that do not depend on the working directory.

The scheduled-name tests create a flow run the way a deployment's scheduler does (state
`Scheduled` at a time in the past, parameters as plain JSON) and execute it the way a worker's
process does (`PREFECT__FLOW_RUN_ID` set, the engine validating the parameters before the run's
context exists). The retry tests call `sft_flow` itself, with no `with_options`, against the
local platform with a preemption scheduled.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow_sync
from prefect.states import Scheduled
from pydantic import ValidationError

from backend import LocalPlatform
from flows.config import SFTConfig, training_identity_hash
from flows.ledger import CheckpointRow, read_ledger
from flows.lifecycle import config_resource_id, derive_id
from flows.scheduling import FLOW_RUN_ID_ENV, render_run_name, scheduled_start_time
from flows.sft import sft_flow
from tests.flows.conftest import platform_config, sft_config
from tests.flows.support import read_run

NIGHTLY = "sft-nightly-{scheduled:%Y%m%d-%H%M}"
WHEN = datetime(2026, 3, 4, 3, 0, tzinfo=UTC)


def test_a_template_names_the_run_from_the_time_and_the_recipe() -> None:
    assert render_run_name(NIGHTLY, recipe="sft", scheduled=WHEN) == "sft-nightly-20260304-0300"
    assert render_run_name("{recipe}-{scheduled:%j}", recipe="rl", scheduled=WHEN) == "rl-063"


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("nightly-{when:%Y}", "{when}"),
        ("nightly-{scheduled.year}", "{scheduled.year}"),
        ("nightly-{scheduled", "malformed"),
        ("nightly-{recipe:%Y}", "cannot be filled in"),
        ("Nightly-{scheduled:%Y%m%d}", "'Nightly-20260304', not a valid run name"),
        ("nightly-{scheduled:%H:%M}", "'nightly-03:00', not a valid run name"),
        ("a-very-long-nightly-run-name-{scheduled:%Y%m%d-%H%M%S}", "not a valid run name"),
    ],
)
def test_a_bad_template_is_refused_with_its_result(template: str, says: str) -> None:
    with pytest.raises(ValueError, match="run_name_template") as caught:
        render_run_name(template, recipe="sft", scheduled=WHEN)
    assert says in str(caught.value)


def test_a_config_refuses_a_bad_template_even_with_a_run_name() -> None:
    with pytest.raises(ValidationError) as caught:
        SFTConfig(run_name="fixed", run_name_template="Nightly-{scheduled:%Y}")
    assert caught.value.errors()[0]["loc"] == ("run_name_template",)
    assert "not a valid run name" in str(caught.value)


def test_outside_a_flow_run_the_template_uses_now_and_run_name_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(FLOW_RUN_ID_ENV, raising=False)
    before = datetime.now(UTC).replace(second=0, microsecond=0)
    name = SFTConfig(run_name_template=NIGHTLY).run_name
    after = datetime.now(UTC)
    stamps = {f"sft-nightly-{t:%Y%m%d-%H%M}" for t in (before, after)}
    assert name in stamps
    fixed = SFTConfig(run_name="sft-adhoc", run_name_template=NIGHTLY)
    assert fixed.run_name == "sft-adhoc"


def test_the_template_is_no_part_of_what_a_run_trains() -> None:
    """A run named by a template resumes under its name alone (its ledger accepts both)."""
    named = SFTConfig(run_name="sft-nightly-20260304-0300")
    templated = SFTConfig(run_name="sft-nightly-20260304-0300", run_name_template=NIGHTLY)
    assert training_identity_hash(named) == training_identity_hash(templated)


@flow(retries=1, retry_delay_seconds=0, persist_result=False)
def _named(config: SFTConfig, fail_first: bool = False) -> dict[str, Any]:
    """The names a scheduled flow run sees: validated by the engine, and built in its body."""
    from prefect.runtime import flow_run

    if fail_first and flow_run.run_count == 1:
        raise RuntimeError("a transient failure: the flow retry must keep the name")
    inside = SFTConfig(run_name_template=NIGHTLY)
    return {"validated": config.run_name, "inside": inside.run_name, "runs": flow_run.run_count}


def _run_scheduled(
    at: datetime, parameters: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Create a flow run scheduled at `at` and execute it as a worker's process would."""
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(
            _named, parameters=parameters, state=Scheduled(scheduled_time=at)
        )
    monkeypatch.setenv(FLOW_RUN_ID_ENV, str(flow_run.id))
    return run_flow_sync(_named, flow_run=flow_run, parameters=parameters)


@pytest.mark.usefixtures("prefect_server")
def test_a_scheduled_flow_run_is_named_from_its_scheduled_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3, minutes=7)
    parameters = {"config": {"run_name_template": NIGHTLY}, "fail_first": True}
    names = _run_scheduled(at, parameters, monkeypatch)
    expected = f"sft-nightly-{at:%Y%m%d-%H%M}"
    assert names == {"validated": expected, "inside": expected, "runs": 2}
    fixed = {"config": {"run_name": "sft-adhoc", "run_name_template": NIGHTLY}}
    assert _run_scheduled(at, fixed, monkeypatch)["validated"] == "sft-adhoc"


@pytest.mark.usefixtures("prefect_server")
def test_the_flow_run_id_in_the_environment_gives_its_scheduled_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(_named, state=Scheduled(scheduled_time=at))
    monkeypatch.setenv(FLOW_RUN_ID_ENV, str(flow_run.id))
    assert scheduled_start_time() == at
    monkeypatch.delenv(FLOW_RUN_ID_ENV)
    assert scheduled_start_time() > at


# Flow retries come from the config, written on the flow run by the flow itself.


def _preempted_config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> SFTConfig:
    platform.schedule_preemption([4])
    return sft_config(platform, run_dir, max_steps=6, checkpoint_every=3, **overrides)


@pytest.mark.usefixtures("prefect_server")
def test_no_flow_retries_in_the_config_means_one_attempt(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    config = _preempted_config(platform, tmp_path / "no-retry", flow_retries=0)
    state = sft_flow(config, return_state=True)  # the decorator says retries=2
    assert state.is_failed()
    record = read_run(state)
    assert record.run_count == 1
    assert record.flow_run.empirical_policy.retries == 0


@pytest.mark.usefixtures("prefect_server")
def test_one_flow_retry_in_the_config_recovers_after_its_delay(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    config = _preempted_config(platform, tmp_path / "one-retry", flow_retries=1, retry_delay_s=1)
    state = sft_flow(config, return_state=True)
    assert state.is_completed(), state.message
    record = read_run(state)
    assert record.run_count == 2
    assert state.result().steps_done == 6
    with get_client(sync_client=True) as client:
        history = client.read_flow_run_states(record.flow_run.id)
    waits = [s for s in history if s.name == "AwaitingRetry"]
    assert len(waits) == 1
    scheduled = waits[0].state_details.scheduled_time
    assert scheduled is not None
    delay = (scheduled - waits[0].timestamp).total_seconds()
    assert 0.9 <= delay <= 1.5, delay
    restarted = [s for s in history if s.is_running() and s.timestamp > waits[0].timestamp]
    assert restarted and restarted[0].timestamp >= scheduled


# Resource ids follow the config, not the directory it was run from.


def test_ids_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = []
    for place in ("here", "there"):
        (tmp_path / place).mkdir()
        monkeypatch.chdir(tmp_path / place)
        default = SFTConfig(run_name="portable")
        relative = SFTConfig(run_name="portable", run_dir="runs/elsewhere")
        ids.append((config_resource_id(default, "trainer"), config_resource_id(relative, "deploy")))
        assert default.resolved_run_dir.startswith(str(tmp_path / place))
    assert ids[0] == ids[1]
    assert ids[0][0] == derive_id("portable", "runs/portable", "trainer")
    url = SFTConfig(run_name="portable", run_dir="s3://bucket/runs/portable/")
    assert config_resource_id(url, "trainer") == derive_id(
        "portable", "s3://bucket/runs/portable", "trainer"
    )


@pytest.mark.usefixtures("prefect_server")
def test_a_run_keeps_the_trainer_job_its_ledger_records(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    """A run begun when ids hashed the absolute directory resumes on that job."""
    run_dir = tmp_path / "older"
    old_job = derive_id(run_dir.name, str(run_dir.absolute()) + "-as-once-derived", "trainer")
    own = platform_config(platform)
    begun = sft_config(platform, run_dir, max_steps=3, checkpoint_every=3).model_copy(
        update={"platform": own.model_copy(update={"trainer_job_id": old_job})}
    )
    assert sft_flow(begun).trainer_job_id == old_job
    resumed = begun.model_copy(update={"platform": own, "max_steps": 6, "extend": True})
    result = sft_flow(resumed)
    assert result.trainer_job_id == old_job != config_resource_id(resumed, "trainer")
    rows = [row for row in read_ledger(run_dir) if isinstance(row, CheckpointRow)]
    assert [(row.next_step, row.job_id) for row in rows] == [(3, old_job), (6, old_job)]
