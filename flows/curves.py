"""A run's curves as one picture: loss, learning rate, evaluations, RL reward and KL.

Drawn with matplotlib from the per-step metrics (`metrics.jsonl`) and the ledger's evaluation
rows, into `<run_dir>/curves.png` (for people without the Prefect UI) and a markdown artifact
with the PNG inline, which the Prefect UI shows as an image. matplotlib is imported on the first
drawing only, so a flow that never draws never pays for it.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "CURVES_FILENAME",
    "CurveData",
    "CurvesReport",
    "Panel",
    "Series",
    "curve_panels",
    "curves_markdown",
    "draw_curves",
    "write_png",
]

CURVES_FILENAME = "curves.png"
MAX_PANELS = 9  # a 3 x 3 grid at most: each panel stays readable at a small size
MAX_POINTS = 2000  # per series: a long run is drawn from bin means, not 100k points
DPI = 80
SMOOTH_FROM = 50  # a train series with more points gets a smoothed line over faint raw ones
LEGEND_AT = "best"


@dataclass(frozen=True)
class _PanelSpec:
    """A panel and the metric keys it draws (shell patterns), in drawing order."""

    title: str
    keys: tuple[str, ...]
    smooth: bool = True  # a schedule (the learning rate) is exact: drawn as is


# Keys that mean the same across recipes share a panel; the first panel drawn is the one
# holding the recipe's headline metric.
PANEL_SPECS: tuple[_PanelSpec, ...] = (
    _PanelSpec(
        "loss",
        tuple(
            f"{prefix}/{name}"
            for prefix in ("train", "eval")
            for name in (
                "ce_loss",
                "dpo_loss",
                "orpo_loss",
                "loss",
                "mean_loss",
                "sft_loss",
                "or_loss",
            )
        ),
    ),
    _PanelSpec(
        "reward",
        (
            "rollout/raw_reward",
            "rollout/reward",
            "eval/reward",
            "train/chosen_reward",
            "train/rejected_reward",
            "eval/chosen_reward",
            "eval/rejected_reward",
        ),
    ),
    _PanelSpec("KL", ("train/ref_kl", "train/inference_kld")),
    _PanelSpec(
        "accuracy",
        ("train/accuracy", "rollout/accuracy", "eval/accuracy", "eval/exact_match", "eval/pass@*"),
    ),
    _PanelSpec(
        "margin", ("train/margin", "eval/margin", "train/log_odds_ratio", "eval/log_odds_ratio")
    ),
    _PanelSpec(
        "log-prob per token",
        tuple(f"{p}/{side}_avg_lp" for p in ("train", "eval") for side in ("chosen", "rejected")),
    ),
    _PanelSpec("learning rate", ("train/lr",), smooth=False),
)
# Evaluation counters and values another panel already shows (perplexity is exp(loss)).
NOT_DRAWN: frozenset[str] = frozenset(
    {"eval/tokens", "eval/ppl", "eval/sample_fails", "eval/batch_pairs"}
)


@dataclass(frozen=True)
class Series:
    """One metric's points; `evaluation`: few points at cadence points, drawn as markers."""

    key: str
    steps: tuple[float, ...]
    values: tuple[float, ...]
    evaluation: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    smooth: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.series)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def drawable(key: str, headline_metric: str) -> bool:
    """Whether a per-step metric can appear in a panel (only those are kept in memory)."""
    return key == headline_metric or any(_matches(key, spec.keys) for spec in PANEL_SPECS)


@dataclass
class CurveData:
    """The points a picture is drawn from: per-step metrics and evaluations, by key."""

    headline_metric: str
    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    evaluations: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            if _finite(value) and drawable(key, self.headline_metric):
                self.train.setdefault(key, []).append((step, float(value)))

    def set_evaluations(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """The evaluations so far (the ledger's rows: replaced, not appended, each time)."""
        self.evaluations = {}
        for step, metrics in rows:
            for key, value in metrics.items():
                if _finite(value) and key not in NOT_DRAWN:
                    self.evaluations.setdefault(key, []).append((step, float(value)))

    def load_metrics_jsonl(self, data: bytes) -> None:
        """Per-step rows already written (a resumed attempt draws the whole run)."""
        for line in data.splitlines():
            try:
                row = json.loads(line)
                step = int(row.pop("step"))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
            self.add_step(step, row)

    @property
    def last_step(self) -> int | None:
        steps = [points[-1][0] for points in self.train.values() if points]
        return max(steps) if steps else None


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(key: str, points: Sequence[tuple[int, float]], *, evaluation: bool) -> Series:
    if len(points) > MAX_POINTS:  # bin means keep the shape of a noisy curve
        size = math.ceil(len(points) / MAX_POINTS)
        bins = [points[i : i + size] for i in range(0, len(points), size)]
        steps = tuple(sum(p[0] for p in b) / len(b) for b in bins)
        values = tuple(sum(p[1] for p in b) / len(b) for b in bins)
        return Series(key, steps, values, evaluation)
    return Series(key, tuple(float(p[0]) for p in points), tuple(p[1] for p in points), evaluation)


def curve_panels(data: CurveData) -> list[Panel]:
    """The panels to draw: the specs' panels that have data (the headline's first), then one
    panel per other evaluation metric; a series equal to one already in its panel (`train/loss`
    beside `train/ce_loss`) is left out. At most `MAX_PANELS`."""
    panels: list[Panel] = []
    placed: set[str] = set()
    for spec in PANEL_SPECS:
        series: list[Series] = []
        for pattern in spec.keys:
            source = data.evaluations if pattern.startswith("eval/") else data.train
            for key in sorted(k for k in source if fnmatch.fnmatchcase(k, pattern)):
                if key in placed:
                    continue
                placed.add(key)
                candidate = _series(key, source[key], evaluation=source is data.evaluations)
                if not any(s.values == candidate.values for s in series):
                    series.append(candidate)
        if series:
            panels.append(Panel(spec.title, tuple(series), spec.smooth))
    headline = data.headline_metric
    if headline not in placed and headline in data.train:
        panels.insert(
            0, Panel(headline, (_series(headline, data.train[headline], evaluation=False),))
        )
    panels.sort(key=lambda panel: headline not in panel.keys)  # stable: the headline's first
    for key in sorted(set(data.evaluations) - placed):
        panels.append(Panel(key, (_series(key, data.evaluations[key], evaluation=True),)))
    return panels[:MAX_PANELS]


def draw_curves(panels: Sequence[Panel], title: str, *, dpi: int = DPI) -> bytes:
    """The panels as one PNG. Uses matplotlib's object API with the Agg canvas, so the
    process's pyplot backend (a notebook's, say) is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    width, height = 3.6 * cols, 2.5 * rows + 0.4
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    # Fixed margins in inches: an automatic layout draws the figure twice, doubling the cost.
    figure.subplots_adjust(
        left=0.55 / width,
        right=1 - 0.15 / width,
        bottom=0.45 / height,
        top=1 - 0.75 / height,
        wspace=0.35,
        hspace=0.6,
    )
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for series in panel.series:
            if series.evaluation:
                ax.plot(series.steps, series.values, "o--", ms=4, lw=1, label=series.key)
            elif (
                panel.smooth and len(series.values) > SMOOTH_FROM
            ):  # noisy: faint raw points, a smoothed line
                (raw,) = ax.plot(series.steps, series.values, lw=0.8, alpha=0.3)
                smooth = _rolling_mean(series.values)
                ax.plot(series.steps, smooth, lw=1.4, color=raw.get_color(), label=series.key)
            else:
                ax.plot(series.steps, series.values, lw=1.2, label=series.key)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if panel.keys != (panel.title,):
            ax.legend(fontsize=7, frameon=False, loc=LEGEND_AT)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, "no metrics yet", ha="center", va="center")
    figure.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def _rolling_mean(values: Sequence[float]) -> list[float]:
    """A centred moving average over a twentieth of the points (at least 5): no lag on a
    trend, unlike an exponential average; narrower windows at the two ends."""
    half = max(2, len(values) // 40)
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    smoothed = []
    for i in range(len(values)):
        low, high = max(0, i - half), min(len(values), i + half + 1)
        smoothed.append((sums[high] - sums[low]) / (high - low))
    return smoothed


def curves_markdown(png: bytes, title: str, note: str) -> str:
    """A markdown document with the PNG inline as a `data:` URI (the Prefect UI's markdown
    renderer lets `data:image/` through for images, and nothing else needs hosting)."""
    encoded = base64.b64encode(png).decode("ascii")
    return f"# Curves: {title}\n\n{note}\n\n![curves](data:image/png;base64,{encoded})\n"


def write_png(run_dir: str, png: bytes) -> str:
    """`<run_dir>/curves.png`, replaced whole: a local file is written aside and renamed, an
    object store gets one PUT; a reader never sees half a picture. Returns its path."""
    path = f"{run_dir}/{CURVES_FILENAME}"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        target = Path(fs_path)
        aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        aside.write_bytes(png)
        aside.replace(target)
    else:
        fs.pipe_file(fs_path, png)
    return path


@dataclass
class CurvesReport:
    """When to draw: at a cadence point once `interval_s` has passed since the last picture
    (the first one `interval_s` after the attempt began), when the point's evaluation arrives
    after its checkpoint was drawn, and always at the end of the run."""

    data: CurveData
    interval_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _last_drawn_at: float = field(init=False)
    _last_drawn: tuple[int | None, int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._last_drawn_at = self.clock()

    def _state(self) -> tuple[int | None, int]:
        return self.data.last_step, sum(len(p) for p in self.data.evaluations.values())

    def due(self, *, final: bool) -> bool:
        state = self._state()
        if state == self._last_drawn:
            return False  # nothing new to show
        if final or self.clock() - self._last_drawn_at >= self.interval_s:
            return True
        # the evaluation of the point just drawn: worth a second picture
        return self._last_drawn is not None and self._last_drawn[0] == state[0]

    def drawn(self) -> None:
        self._last_drawn_at = self.clock()
        self._last_drawn = self._state()
