"""What a run shows while it trains: `metrics.jsonl`, Prefect artifacts, W&B, a progress hook.

Per-step metrics go to `run_dir/metrics.jsonl` (rewound on resume, so a replayed step appears
once) and to W&B; Prefect gets a progress artifact per attempt (updated in place at most every
`progress_interval_s`), a table artifact with one row per segment, and a markdown artifact of
the ledger. Prefect's server spends real CPU on every artifact write (tens of milliseconds, on
the machine that may be training), so per-step data never goes there, and the table and the
ledger report are written together once per cadence point (`report_ledger`), at most every
`report_interval_s`, and always at the end of the run and of a failed attempt. The curves
picture (`flows/curves.py`) is redrawn at cadence points, at most every `curves_interval_s`
and always at the end, into `run_dir/curves.png` and one artifact key; matplotlib takes a tenth
of a second or more per picture, so each is drawn on a helper thread while training goes on (one
at a time), the end's beside the teardown (`wait_for_pictures`). A caller in this process (the
CLI) can watch every step through `progress_listener`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.curves import (
    CurveData,
    CurvesReport,
    Panel,
    curve_panels,
    curves_markdown,
    draw_curves,
    write_png,
)
from flows.ledger import CheckpointRow, EvaluationRow, HotloadRow, Ledger, RunEndRow
from flows.ledger_storage import storage_for
from flows.wandb_run import WandbRun
from tasks.training import SegmentResult, StepRecord

__all__ = ["MetricsLog", "Progress", "RunMonitor", "artifact_key", "progress_listener"]

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"


@dataclass(frozen=True)
class Progress:
    """One finished optimizer step, as the CLI sees it."""

    step: int  # 0-based step just done
    total_steps: int
    metrics: Mapping[str, float]
    headline_metric: str = "train/loss"  # the recipe's metric a person watches


ProgressCallback = Callable[[Progress], None]
_listener: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar(
    "fireloop_progress_listener", default=None
)


@contextmanager
def progress_listener(callback: ProgressCallback | None) -> Iterator[None]:
    """Call `callback` after every optimizer step of the flows run in this block."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


class MetricsLog:
    """`run_dir/metrics.jsonl`: one JSON object per step, in step order."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._storage = storage_for(f"{run_dir}/{METRICS_FILENAME}")

    def read(self) -> bytes:
        return self._storage.read() or b""

    def rewind(self, next_step: int) -> None:
        """Drop the rows of steps ≥ `next_step`: they are about to be replayed."""
        data = self._storage.read()
        if not data:
            return
        offset = 0
        for line in data.splitlines(keepends=True):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                break  # a torn last line: cut it with the rest
            if step >= next_step:
                break
            offset += len(line)
        if offset < len(data):
            self._storage.truncate(offset)

    def append(self, steps: Sequence[StepRecord]) -> None:
        lines = [
            json.dumps(
                {
                    "step": record.step,
                    "epoch": record.epoch,
                    "data_cursor": record.data_cursor,
                    "row_indices": record.row_indices,
                    **record.metrics,
                },
                sort_keys=True,
            )
            + "\n"
            for record in steps
        ]
        if lines:
            self._storage.append("".join(lines).encode("utf-8"))


@dataclass
class RunMonitor:
    """The observers of one attempt; `close()` ends them (W&B finishes every attempt)."""

    recipe: str
    run_name: str
    total_steps: int
    metrics_log: MetricsLog
    headline_metric: str
    wandb: WandbRun | None = None
    progress_interval_s: float = 5.0
    report_interval_s: float = 10.0  # the segment table and ledger report, at most this often
    curves_interval_s: float = 30.0  # the curves picture is redrawn at most this often
    _progress_id: Any = field(default=None, init=False)
    _last_progress: float = field(default=0.0, init=False)
    _segment_rows: list[dict[str, Any]] = field(default_factory=list, init=False)
    # What the artifacts show already (segment rows, ledger rows) and when they were written.
    _reported: tuple[int, int] = field(default=(0, 0), init=False)
    _last_report: float = field(default=-math.inf, init=False)
    _pending: tuple[Ledger, str | None] | None = field(default=None, init=False)
    _listener: ProgressCallback | None = field(default=None, init=False)
    _curves: CurvesReport = field(init=False)
    _drawing: threading.Thread | None = field(default=None, init=False)  # a point's picture

    def __post_init__(self) -> None:
        self._listener = _listener.get()  # captured in the flow's context, called from tasks
        self._curves = CurvesReport(CurveData(self.headline_metric), self.curves_interval_s)

    def key(self, kind: str) -> str:
        return artifact_key(self.recipe, self.run_name, kind)

    def start(self, next_step: int) -> None:
        """A progress artifact for this attempt, at the resumed step."""
        self.metrics_log.rewind(next_step)
        self._curves.data.load_metrics_jsonl(self.metrics_log.read())  # earlier attempts' steps
        self._progress_id = create_progress_artifact(
            progress=self._percent(next_step),
            key=self.key("progress"),
            description=f"{self.recipe} {self.run_name}: optimizer steps done",
        )
        self._last_progress = time.monotonic()

    def _percent(self, steps_done: int) -> float:
        return 100.0 * steps_done / self.total_steps

    def on_step(self, record: StepRecord) -> None:
        """Per step: the progress hook; the progress artifact at most every few seconds."""
        if self._listener is not None:
            self._listener(
                Progress(record.step, self.total_steps, record.metrics, self.headline_metric)
            )
        now = time.monotonic()
        done = record.step + 1
        if self._progress_id is not None and (
            now - self._last_progress >= self.progress_interval_s or done == self.total_steps
        ):
            update_progress_artifact(self._progress_id, progress=self._percent(done))
            self._last_progress = now

    def record_segment(self, result: SegmentResult) -> None:
        """Per segment: metrics.jsonl, W&B, and a row of the segment table (written to its
        artifact by the next `report_ledger`)."""
        self.metrics_log.append(result.steps)
        for record in result.steps:
            self._curves.data.add_step(record.step, record.metrics)
        if self.wandb is not None:
            for record in result.steps:
                self.wandb.log(record.step, record.metrics)
        if not result.steps:
            return
        last = result.steps[-1]
        name = self.headline_metric.rsplit("/", 1)[-1]
        # A step may lack the metric (an RL step whose every group was filtered out).
        headline = self.headline_metric
        values = [r.metrics[headline] for r in result.steps if headline in r.metrics] or [math.nan]
        self._segment_rows.append(
            {
                "steps": f"{result.segment.first}-{result.segment.last}",
                f"mean_{name}": round(sum(values) / len(values), 5),
                f"last_{name}": round(values[-1], 5),
                "lr": last.metrics["train/lr"],
                "data_cursor": last.data_cursor,
                "checkpoint": result.confirmed_name or result.saved_name or "",
            }
        )

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log(step, metrics)

    def report_ledger(self, ledger: Ledger, deployment_id: str | None) -> None:
        """At a cadence point: the segment table and the ledger as a markdown artifact
        (checkpoints, hotloaded snapshots, evaluations) when they changed and
        `report_interval_s` has passed, or the run has ended; the curves when due."""
        final = bool(ledger.rows) and isinstance(ledger.rows[-1], RunEndRow)
        self._pending = (ledger, deployment_id)
        if final or time.monotonic() - self._last_report >= self.report_interval_s:
            self._write_reports()
        evaluations = [(r.step, r.metrics) for r in ledger.rows if isinstance(r, EvaluationRow)]
        self._curves.data.set_evaluations(evaluations)
        if self._curves.due(final=final):
            self._draw_curves()

    def _write_reports(self) -> None:
        """The segment table and the ledger report, each only if it changed since written."""
        if self._pending is None:
            return
        ledger, deployment_id = self._pending
        segments, rows = len(self._segment_rows), len(ledger.rows)
        if segments != self._reported[0]:
            create_table_artifact(
                self._segment_rows,
                key=self.key("segments"),
                description=f"{self.recipe} {self.run_name}: metrics per segment",
            )
        if rows != self._reported[1]:
            create_markdown_artifact(
                ledger_markdown(ledger, deployment_id),
                key=self.key("ledger"),
                description=f"{self.recipe} {self.run_name}: run ledger",
            )
        self._reported, self._last_report = (segments, rows), time.monotonic()

    def _draw_curves(self) -> None:
        """`curves.png` in the run directory and a new version of the curves artifact, drawn
        on a helper thread after the previous picture is done (the versions keep their order).
        The data is taken here: training goes on meanwhile."""
        self.wait_for_pictures()
        self._curves.drawn()
        try:
            panels = curve_panels(self._curves.data)  # tuples: the thread's own copy
        except Exception:  # a picture must never fail the run it shows
            logger.warning("could not draw the curves of %s", self.run_name, exc_info=True)
            return
        last = self._curves.data.last_step
        # The copied context carries the flow run's, which the artifact is created under.
        context = contextvars.copy_context()
        self._drawing = threading.Thread(
            target=context.run,
            args=(self._publish_curves, panels, last),
            name=f"curves-{self.run_name}",
            daemon=True,
        )
        self._drawing.start()

    def wait_for_pictures(self) -> None:
        """Until the picture being drawn, if any, is written (the attempt's end waits)."""
        drawing, self._drawing = self._drawing, None
        if drawing is not None:
            drawing.join()

    def _publish_curves(self, panels: list[Panel], last: int | None) -> None:
        """Draw and write one picture. A picture that cannot be drawn or written is logged
        and skipped: it must not stop the training it depicts."""
        started = time.perf_counter()
        title = f"{self.recipe} {self.run_name}"
        try:
            png = draw_curves(panels, title)
            path = write_png(self.metrics_log.run_dir, png)
            note = f"After {0 if last is None else last + 1} steps; the same picture: `{path}`."
            create_markdown_artifact(
                curves_markdown(png, title, note),
                key=self.key("curves"),
                description=f"{title}: loss, learning rate, evaluations",
            )
        except Exception:  # a picture must never fail the run it shows
            logger.warning("could not draw the curves of %s", title, exc_info=True)
            return
        logger.debug(
            "curves of %s: %d bytes in %.0f ms",
            title,
            len(png),
            1000 * (time.perf_counter() - started),
        )

    def close(self, *, failed: bool, report: bool = True) -> None:
        """End the observers; first write what the artifacts do not show yet (`report`:
        False when a signal ends the attempt and there is no time for it)."""
        if report:
            try:
                self._write_reports()
            except Exception:  # a report must not replace the attempt's own outcome
                logger.warning("could not write the reports of %s", self.run_name, exc_info=True)
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def ledger_markdown(ledger: Ledger, deployment_id: str | None) -> str:
    """Markdown tables of the ledger's checkpoint, hotload and evaluation rows."""
    lines = [
        f"# Run {ledger.header.run_id} ({ledger.header.recipe})",
        "",
        f"Ledger: `{ledger.path}`  ",
        f"Base model: `{ledger.header.base_model}`, LoRA rank {ledger.header.lora_rank}  ",
        f"Deployment: `{deployment_id or 'none'}`",
        "",
        "## Checkpoints",
        "",
        "| name | next step | data cursor | snapshot | time |",
        "|---|---|---|---|---|",
    ]
    rows = ledger.rows
    for row in rows:
        if isinstance(row, CheckpointRow):
            lines.append(
                f"| {row.name} | {row.next_step} | {row.data_cursor} | "
                f"{row.snapshot_identity or ''} | {row.time:%Y-%m-%d %H:%M:%S} |"
            )
    lines += ["", "## Hotloads", "", "| step | identity | type | verified |", "|---|---|---|---|"]
    for row in rows:
        if isinstance(row, HotloadRow):
            kind = row.checkpoint_type or ""
            lines.append(f"| {row.step} | {row.identity} | {kind} | {row.verified} |")
    lines += ["", "## Evaluations", "", "| step | metrics |", "|---|---|"]
    for row in rows:
        if isinstance(row, EvaluationRow):
            shown = ", ".join(f"{k} = {v:.4g}" for k, v in sorted(row.metrics.items()))
            lines.append(f"| {row.step} | {shown} |")
    return "\n".join(lines) + "\n"
