"""What a cadence point costs Prefect: its task runs and artifact writes, and heartbeats.

Prefect's server spends tens of milliseconds of CPU on each task run and artifact write, on the
machine that may be training, so a point gets one task per thing the UI shows (segment, hotload,
evaluation) and its reports are written once. A short SFT run's task runs and artifacts are read
back from the server; the monitor's report throttle and its flush at the end of a failed attempt
are checked on their own; and the CLI turns heartbeats off only where no server outlives it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import get_current_settings

from backend import LocalPlatform
from fireloop.run_cli import flow_heartbeats
from flows.ledger import CheckpointRow, EvaluationRow, Ledger, RunEndRow, read_ledger
from flows.monitoring import MetricsLog, RunMonitor
from flows.sft import configured_sft_flow
from tasks.training import Segment, SegmentResult, StepRecord
from tests.flows.conftest import sft_config
from tests.flows.support import flow_run_id, read_run, sft_header

pytestmark = pytest.mark.usefixtures("prefect_server")


def _task_run_names(state: Any) -> list[str]:
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flow_filter, limit=200)
    return sorted(run.name for run in runs)


def test_a_cadence_point_is_a_segment_a_hotload_and_an_evaluation(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    """Two points (5 and 10) with a save, a hotload and an evaluation each: the save's
    read-back is part of the segment and the evaluation is one task, not one per operation."""
    run_dir = tmp_path / "cost"
    config = sft_config(
        platform, run_dir, max_steps=10, eval_every=5, hotload_every=5, sample_eval=True
    )
    state = configured_sft_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message

    names = _task_run_names(state)
    per_point = [n for n in names if n.startswith(("train steps", "hotload", "evaluate"))]
    assert per_point == [
        "evaluate step 0",
        "evaluate step 10",
        "evaluate step 5",
        "hotload step-0",
        "hotload step-10",
        "hotload step-5",
        "train steps 0-4",
        "train steps 5-9",
    ], names
    assert not [n for n in names if "confirm" in n or n.startswith(("eval loss", "sample"))]

    # The ledger still records the names read back, and the reports show every row.
    rows = read_ledger(run_dir)
    assert [r.name for r in rows if isinstance(r, CheckpointRow)] == ["step-5", "step-10"]
    record = read_run(state)
    segments = json.loads(record.artifact("-segments")["data"])
    assert [(r["steps"], r["checkpoint"]) for r in segments] == [
        ("0-4", "step-5"),
        ("5-9", "step-10"),
    ]
    ledger_report = record.artifact("-ledger")["data"]
    assert "step-10" in ledger_report and "exact_match" in ledger_report
    # Written once per point at most (3 points, the last one the run's end), never per row.
    versions = Counter(str(a["key"]).rsplit("-", 1)[-1] for a in record.artifacts)
    assert versions["ledger"] <= 3 and versions["segments"] <= 3, versions


def _monitor(run_dir: str, interval_s: float) -> tuple[RunMonitor, Ledger]:
    header = sft_header("throttle")
    monitor = RunMonitor(
        recipe="sft",
        run_name=f"throttle-{Path(run_dir).name}",
        total_steps=6,
        metrics_log=MetricsLog(run_dir),
        headline_metric="train/ce_loss",
        report_interval_s=interval_s,
        curves_interval_s=3600.0,
    )
    return monitor, Ledger.open(run_dir, header)


def _segment(monitor: RunMonitor, first: int) -> None:
    steps = [
        StepRecord(step=s, epoch=0, data_cursor=s + 1, row_indices=[s], metrics=_loss(s))
        for s in (first, first + 1)
    ]
    segment = Segment(job_id="job", start=first, end=first + 2, data_cursor=first)
    monitor.record_segment(SegmentResult(segment=segment, steps=steps))


def _loss(step: int) -> dict[str, float]:
    return {"train/ce_loss": 2.0 - 0.1 * step, "train/lr": 0.1}


def _versions(monitor: RunMonitor, kind: str) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[monitor.key(kind)]))
        )


def test_reports_are_written_at_most_every_interval_and_at_the_end(tmp_path: Path) -> None:
    monitor, ledger = _monitor(str(tmp_path / "end"), interval_s=3600.0)

    @flow(name="reports-throttled")
    def three_points_and_the_end() -> None:
        monitor.start(0)
        for first in (0, 2, 4):
            _segment(monitor, first)
            ledger.append(EvaluationRow(step=first + 2, metrics={"eval/loss": 1.0}))
            monitor.report_ledger(ledger, None)
        ledger.append(RunEndRow(next_step=6, data_cursor=6))
        monitor.report_ledger(ledger, None)

    three_points_and_the_end()
    # The first point, then nothing for an hour, then the end: two versions of each.
    assert len(_versions(monitor, "segments")) == 2
    ledgers = _versions(monitor, "ledger")
    assert len(ledgers) == 2
    latest = max(ledgers, key=lambda a: a.created or 0)
    assert "| 6 |" in str(latest.data) and "eval/loss" in str(latest.data)


def test_a_failed_attempt_writes_what_its_reports_do_not_show_yet(tmp_path: Path) -> None:
    monitor, ledger = _monitor(str(tmp_path / "failed"), interval_s=3600.0)

    @flow(name="reports-flushed")
    def two_points_then_a_failure() -> None:
        monitor.start(0)
        for first in (0, 2):
            _segment(monitor, first)
            ledger.append(EvaluationRow(step=first + 2, metrics={"eval/loss": 1.0}))
            monitor.report_ledger(ledger, None)
        monitor.close(failed=True)

    two_points_then_a_failure()
    segments = max(_versions(monitor, "segments"), key=lambda a: a.created or 0)
    assert [row["steps"] for row in json.loads(str(segments.data))] == ["0-1", "2-3"]
    assert len(_versions(monitor, "ledger")) == 2


def test_heartbeats_are_off_only_where_no_server_outlives_the_cli() -> None:
    default = get_current_settings().flows.heartbeat_frequency
    with flow_heartbeats(watched=False):
        assert get_current_settings().flows.heartbeat_frequency is None
    with flow_heartbeats(watched=True):
        assert get_current_settings().flows.heartbeat_frequency == default
