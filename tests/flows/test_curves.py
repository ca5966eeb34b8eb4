"""The curves picture: which panels a run gets, when it is redrawn, and what a run leaves.

Pure parts first (panel choice, smoothing input, throttle with a hand-driven clock, PNG and
markdown); then the monitor writing one artifact key in versions; then a short SFT flow and a
short RL flow end to end, whose `curves.png` and curves artifact are read back.
"""

from __future__ import annotations

import base64
import math
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fsspec
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from backend import LocalPlatform
from flows.config import RLConfig
from flows.curves import (
    MAX_POINTS,
    CurveData,
    CurvesReport,
    Panel,
    curve_panels,
    curves_markdown,
    draw_curves,
    write_png,
)
from flows.ledger import EvaluationRow, Ledger, RunEndRow, read_ledger
from flows.monitoring import MetricsLog, RunMonitor
from flows.rl import configured_rl_flow
from flows.sft import configured_sft_flow
from tasks.training import Segment, SegmentResult, StepRecord
from tests.flows.conftest import FAST_WAITS, platform_config, sft_config
from tests.flows.support import read_run, sft_header

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (a PNG starts with it)."""
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def sft_like(steps: int) -> CurveData:
    data = CurveData("train/ce_loss")
    for step in range(steps):
        loss = 3.0 / (step + 1)
        metrics = {"train/ce_loss": loss, "train/loss": loss, "train/ppl": math.exp(loss)}
        data.add_step(step, metrics | {"train/lr": 1e-3, "train/grad_norm": 1.0})
    data.set_evaluations(
        [
            (0, {"eval/loss": 3.0, "eval/ppl": 20.0, "eval/tokens": 99.0}),
            (steps, {"eval/loss": 1.0, "eval/ppl": 2.7, "eval/tokens": 99.0}),
        ]
    )
    return data


def test_an_sft_run_gets_loss_first_then_learning_rate() -> None:
    panels = curve_panels(sft_like(10))
    assert [(p.title, p.keys) for p in panels] == [
        ("loss", ("train/ce_loss", "eval/loss")),  # train/loss is the same curve: drawn once
        ("learning rate", ("train/lr",)),
    ]
    eval_loss = panels[0].series[1]
    assert eval_loss.evaluation and eval_loss.steps == (0.0, 10.0)
    assert eval_loss.values == (3.0, 1.0)


def test_an_rl_run_gets_reward_first_kl_and_its_other_evaluations() -> None:
    data = CurveData("rollout/raw_reward")
    for step in range(3):
        data.add_step(
            step,
            {
                "rollout/raw_reward": 0.1 * step,
                "rollout/accuracy": 0.5,
                "train/ref_kl": 0.01 * step,
                "train/inference_kld": 1e-6,
                "train/mean_loss": 0.2,
                "train/lr": 1e-4,
                "async/version_offset_max": 0.0,  # not a curve anyone asked for
            },
        )
    data.set_evaluations(
        [(3, {"eval/reward": 0.2, "eval/response_len": 5.0, "eval/sample_fails": 0.0})]
    )
    titles = {p.title: p.keys for p in curve_panels(data)}
    assert list(titles) == [
        "reward",
        "loss",
        "KL",
        "accuracy",
        "learning rate",
        "eval/response_len",
    ]
    assert titles["reward"] == ("rollout/raw_reward", "eval/reward")
    assert titles["KL"] == ("train/ref_kl", "train/inference_kld")


DPO_KEYS = ("dpo_loss", "loss", "margin", "accuracy", "chosen_reward", "rejected_reward")
ORPO_KEYS = ("orpo_loss", "loss", "sft_loss", "or_loss", "log_odds_ratio", "accuracy")
ORPO_KEYS += ("chosen_avg_lp", "rejected_avg_lp")


def train_then_eval(*names: str) -> tuple[str, ...]:
    return (*(f"train/{name}" for name in names), *(f"eval/{name}" for name in names))


@pytest.mark.parametrize(
    ("headline", "names", "panels"),
    [
        (
            "train/dpo_loss",
            DPO_KEYS,
            {
                "loss": train_then_eval("dpo_loss"),
                "reward": train_then_eval("chosen_reward", "rejected_reward"),
                "accuracy": train_then_eval("accuracy"),
                "margin": train_then_eval("margin"),
                "learning rate": ("train/lr",),
            },
        ),
        (
            "train/orpo_loss",
            ORPO_KEYS,
            {
                "loss": train_then_eval("orpo_loss", "sft_loss", "or_loss"),
                "accuracy": train_then_eval("accuracy"),
                "margin": train_then_eval("log_odds_ratio"),
                "log-prob per token": train_then_eval("chosen_avg_lp", "rejected_avg_lp"),
                "learning rate": ("train/lr",),
            },
        ),
    ],
)
def test_preference_runs_get_their_losses_accuracies_and_margins(
    headline: str, names: tuple[str, ...], panels: dict[str, tuple[str, ...]]
) -> None:
    """The keys of algorithms/preference_losses.py; evaluation reports the same under eval/."""
    data = CurveData(headline)
    for step in range(3):
        # distinct values per key, as a real run's, so no curve is taken for another's twin
        values = {name: step + i / 10 for i, name in enumerate(names) if name != "loss"}
        values["loss"] = values[headline.removeprefix("train/")]
        data.add_step(step, {f"train/{k}": v for k, v in values.items()} | {"train/lr": 0.1})
    evaluation = {f"eval/{k}": v + 1 for k, v in values.items()} | {"eval/batch_pairs": 8.0}
    data.set_evaluations([(3, evaluation)])
    assert {p.title: p.keys for p in curve_panels(data)} == panels


def test_a_headline_no_panel_names_gets_the_first_panel() -> None:
    data = CurveData("train/custom_objective")
    data.add_step(0, {"train/custom_objective": 1.0, "train/lr": 0.1, "other/thing": 2.0})
    assert [p.title for p in curve_panels(data)] == ["train/custom_objective", "learning rate"]


def test_points_that_are_not_finite_numbers_are_left_out() -> None:
    data = CurveData("train/ce_loss")
    data.load_metrics_jsonl(
        b'{"step": 0, "train/ce_loss": 2.0, "train/lr": NaN}\n'
        b'{"step": 1, "train/ce_loss": Infinity, "train/lr": 0.1}\n'
        b'{"step": 2, "train/ce_loss": 1.0, "train/lr": 0.1}\n'
        b'{"step": 3, "train/ce_lo'  # a torn last line
    )
    assert data.train == {
        "train/ce_loss": [(0, 2.0), (2, 1.0)],
        "train/lr": [(1, 0.1), (2, 0.1)],
    }
    assert data.last_step == 2


def test_a_long_series_is_drawn_from_bin_means() -> None:
    assert MAX_POINTS == 2000  # the numbers below: 4001 points make bins of 3
    data = CurveData("train/ce_loss")
    for step in range(4001):
        data.add_step(step, {"train/ce_loss": float(step % 3)})
    (series,) = curve_panels(data)[0].series
    assert len(series.values) == 1334
    assert series.steps[:2] == (1.0, 4.0) and series.values[:2] == (1.0, 1.0)
    assert (series.steps[-1], series.values[-1]) == (3999.5, 0.5)  # the last bin: 2 points


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_picture_is_redrawn_at_most_every_interval_and_always_at_the_end() -> None:
    clock = Clock()
    data = CurveData("train/ce_loss")
    report = CurvesReport(data, interval_s=30.0, clock=clock)
    for step in range(4):
        data.add_step(step, {"train/ce_loss": 1.0})
    assert not report.due(final=False)  # the attempt began less than 30 s ago
    clock.now += 30
    assert report.due(final=False)
    report.drawn()  # a checkpoint after step 3
    assert not report.due(final=False) and not report.due(final=True)  # nothing new
    # The evaluation of the point just drawn arrives: worth a second picture at once.
    data.set_evaluations([(4, {"eval/loss": 0.8})])
    assert report.due(final=False)
    report.drawn()
    data.add_step(4, {"train/ce_loss": 0.9})
    assert not report.due(final=False)  # 30 s have not passed
    assert report.due(final=True)  # the run's end is always drawn
    clock.now += 30
    assert report.due(final=False)


def test_the_png_and_its_markdown_carry_the_same_picture(tmp_path: Path) -> None:
    png = draw_curves(curve_panels(sft_like(30)), "sft demo")
    width, height = png_size(png)
    assert (width, height) == (576, 232)  # two panels side by side at 80 dpi
    assert 5_000 < len(png) < 150_000
    markdown = curves_markdown(png, "sft demo", "After 30 steps.")
    uri = markdown.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(uri) == png

    assert write_png(str(tmp_path), png) == f"{tmp_path}/curves.png"
    assert (tmp_path / "curves.png").read_bytes() == png
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # nothing left aside
    remote = "memory://runs/curves-test"
    write_png(remote, png)
    assert fsspec.open(f"{remote}/curves.png", "rb").open().read() == png


def test_matplotlib_is_imported_only_to_draw_and_pyplot_never() -> None:
    script = textwrap.dedent(
        """
        import sys
        from flows.curves import CurveData, curve_panels, draw_curves
        assert "matplotlib" not in sys.modules, "imported before any drawing"
        data = CurveData("train/ce_loss")
        data.add_step(0, {"train/ce_loss": 1.0})
        draw_curves(curve_panels(data), "x")
        assert "matplotlib" in sys.modules
        assert "matplotlib.pyplot" not in sys.modules, "pyplot's global backend touched"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.mark.usefixtures("prefect_server")
def test_the_monitor_writes_one_artifact_key_in_versions(tmp_path: Path) -> None:
    """Each picture is a new version of the run's curves key, drawn only when there is news."""
    run_dir = str(tmp_path / "versions")
    header = sft_header("versions")
    ledger = Ledger.open(run_dir, header)
    monitor = RunMonitor(
        recipe="sft",
        run_name=f"versions-{tmp_path.name}",
        total_steps=4,
        metrics_log=MetricsLog(run_dir),
        headline_metric="train/ce_loss",
        curves_interval_s=0.0,
    )

    @flow(name="curves-versions")
    def two_segments_and_the_end() -> None:
        monitor.start(0)
        for first in (0, 2):
            steps = [
                StepRecord(step=s, epoch=0, data_cursor=s + 1, row_indices=[s], metrics=loss(s))
                for s in (first, first + 1)
            ]
            segment = Segment(job_id="job", start=first, end=first + 2, data_cursor=first)
            monitor.record_segment(SegmentResult(segment=segment, steps=steps))
            monitor.report_ledger(ledger, None)
        monitor.report_ledger(ledger, None)  # nothing new: no picture
        ledger.append(EvaluationRow(step=4, metrics={"eval/loss": 0.5}))
        ledger.append(RunEndRow(next_step=4, data_cursor=4))
        monitor.report_ledger(ledger, None)
        monitor.wait_for_pictures()

    two_segments_and_the_end()

    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[monitor.key("curves")]))
        )
    assert len(versions) == 3
    latest = max(versions, key=lambda a: a.created or 0)
    assert "After 4 steps" in str(latest.data)
    png = (tmp_path / "versions" / "curves.png").read_bytes()
    assert base64.b64encode(png).decode() in str(latest.data)


@pytest.mark.usefixtures("prefect_server")
def test_pictures_are_drawn_beside_training_one_at_a_time_and_the_last_is_awaited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cadence point's picture is drawn on a helper thread (report_ledger returns before it
    is done); the end's picture starts after it and `wait_for_pictures` waits for the end's,
    which is the latest version."""
    import flows.monitoring as monitoring

    release, drawn_in = threading.Event(), []
    draw = monitoring.draw_curves

    def slow_draw(panels: list[Panel], title: str) -> bytes:
        drawn_in.append(threading.current_thread().name)
        if len(drawn_in) == 1:
            assert release.wait(30), "the test never released the first picture"
        return draw(panels, title)

    monkeypatch.setattr(monitoring, "draw_curves", slow_draw)
    run_dir = str(tmp_path / "beside")
    ledger = Ledger.open(run_dir, sft_header("beside"))
    monitor = RunMonitor(
        recipe="sft",
        run_name=f"beside-{tmp_path.name}",
        total_steps=2,
        metrics_log=MetricsLog(run_dir),
        headline_metric="train/ce_loss",
        curves_interval_s=0.0,
    )

    @flow(name="curves-beside")
    def a_point_then_the_end() -> bool:
        monitor.start(0)
        steps = [
            StepRecord(step=s, epoch=0, data_cursor=s + 1, row_indices=[s], metrics=loss(s))
            for s in (0, 1)
        ]
        segment = Segment(job_id="job", start=0, end=2, data_cursor=0)
        monitor.record_segment(SegmentResult(segment=segment, steps=steps))
        monitor.report_ledger(ledger, None)  # the point: returns with the picture unfinished
        unfinished = not (tmp_path / "beside" / "curves.png").exists()
        release.set()
        ledger.append(EvaluationRow(step=2, metrics={"eval/loss": 0.5}))
        ledger.append(RunEndRow(next_step=2, data_cursor=2))
        monitor.report_ledger(ledger, None)
        monitor.wait_for_pictures()
        return unfinished

    assert a_point_then_the_end()
    assert drawn_in == [f"curves-{monitor.run_name}"] * 2
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[monitor.key("curves")]))
        )
    assert len(versions) == 2
    latest = max(versions, key=lambda a: a.created or 0)
    png = (tmp_path / "beside" / "curves.png").read_bytes()
    assert base64.b64encode(png).decode() in str(latest.data)  # the end's picture is the last


@pytest.mark.usefixtures("prefect_server")
def test_a_resumed_attempt_draws_the_steps_it_keeps(tmp_path: Path) -> None:
    """The steps earlier attempts wrote are drawn again; the ones about to be replayed are not."""
    run_dir = str(tmp_path)
    log = MetricsLog(run_dir)
    log.append(
        [
            StepRecord(step=s, epoch=0, data_cursor=s + 1, row_indices=[s], metrics=loss(s))
            for s in range(4)
        ]
    )
    monitor = RunMonitor("sft", "resumed", 4, MetricsLog(run_dir), "train/ce_loss")
    flow(name="curves-resume")(monitor.start)(2)  # the last checkpoint said: next step 2
    assert monitor._curves.data.train["train/ce_loss"] == [(0, 2.0), (1, 1.9)]


def loss(step: int) -> dict[str, float]:
    return {"train/ce_loss": 2.0 - 0.1 * step, "train/loss": 2.0 - 0.1 * step, "train/lr": 0.1}


def curves_artifact_png(state_record_artifacts: list[dict[str, object]]) -> bytes:
    (artifact,) = [a for a in state_record_artifacts if str(a["key"]).endswith("-curves")]
    data = str(artifact["data"])
    assert artifact["type"] == "markdown"
    return base64.b64decode(data.split("data:image/png;base64,", 1)[1].split(")", 1)[0])


@pytest.mark.usefixtures("prefect_server")
def test_an_sft_run_leaves_curves_png_and_an_artifact(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "curves-sft"
    config = sft_config(
        platform, run_dir, max_steps=6, batch_size=4, checkpoint_every=2, eval_every=3
    )
    state = configured_sft_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message

    png = (run_dir / "curves.png").read_bytes()
    width, height = png_size(png)
    assert width >= 400 and height >= 200 and 5_000 < len(png) < 300_000
    # The short run draws once, at its end: the artifact holds the same picture.
    assert curves_artifact_png(read_run(state).artifacts) == png


def rl_config(platform: LocalPlatform, run_dir: Path) -> RLConfig:
    return RLConfig(
        run_name=run_dir.name,
        run_dir=str(run_dir),
        max_steps=2,
        checkpoint_every=2,
        eval_every=2,
        retry_delay_s=0,
        waits=FAST_WAITS,
        platform=platform_config(platform),
        reward="tests.flows.rl_rewards:parity",
        completions_per_prompt=4,
        prompt_groups_per_step=2,
        max_completion_tokens=4,
        kl_beta=0.01,
    )


@pytest.mark.usefixtures("prefect_server")
def test_an_rl_run_draws_reward_and_kl(platform: LocalPlatform, tmp_path: Path) -> None:
    run_dir = tmp_path / "curves-rl"
    config = rl_config(platform, run_dir)
    state = configured_rl_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message

    # What the monitor drew from: the run's metrics and its ledger's evaluations.
    data = CurveData(config.headline_metric)
    data.load_metrics_jsonl((run_dir / "metrics.jsonl").read_bytes())
    evaluations = [
        (row.step, row.metrics) for row in read_ledger(run_dir) if isinstance(row, EvaluationRow)
    ]
    data.set_evaluations(evaluations)
    panels = {panel.title: panel.keys for panel in curve_panels(data)}
    assert next(iter(panels)) == "reward"
    assert {"rollout/raw_reward", "eval/reward"} <= set(panels["reward"])
    assert {"train/ref_kl", "train/inference_kld"} <= set(panels["KL"])
    assert "train/lr" in panels["learning rate"]

    png = (run_dir / "curves.png").read_bytes()
    assert png_size(png)[1] > 400  # two or three rows of panels
    assert curves_artifact_png(read_run(state).artifacts) == png
