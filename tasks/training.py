"""The training segment: the optimizer steps between two cadence points, then the state save.

One task run per segment, never one per step (prefect.md §15). A segment sends ordered trainer
operations, so it is never retried in place (`retries=0`): a failure mid-segment leaves the
outcome of its last step unknown, and recovery is the flow retry, which reloads the last
resumable checkpoint of the ledger and replays the segment on the same rows (design.md).
The learning rate of each step is a pure function of the step; the rows of each step a pure
function of the data cursor, so the replay is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field
from tinker import types

from algorithms.datums import GradNormalization, SFTBatch, mean_ce_loss
from algorithms.schedules import LRSchedule, learning_rate_at
from tasks.errors import trainer_call
from tasks.platform import Waits
from tasks.policy import LONG_TIMEOUT_S, SHORT_TIMEOUT_S

if TYPE_CHECKING:
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "AdamConfig",
    "BatchSource",
    "OptimizerPlan",
    "Segment",
    "SegmentResult",
    "SourcedBatch",
    "StepRecord",
    "evaluate_loss",
    "train_segment",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdamConfig(_Model):
    """AdamW settings besides the learning rate (recipes.md §2 `adam`)."""

    beta1: float = Field(default=0.9, ge=0, lt=1, description="First-moment decay.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="Second-moment decay.")
    eps: float = Field(default=1e-12, ge=0, description="Added to the denominator.")
    weight_decay: float = Field(default=0.01, ge=0, description="Decoupled weight decay.")
    grad_clip_norm: float = Field(default=1.0, ge=0, description="0 = no clipping.")


class OptimizerPlan(_Model):
    """Everything `optim_step` needs, for any step: the schedule and the normalisation."""

    peak_lr: float = Field(gt=0)
    total_steps: int = Field(gt=0)
    schedule: LRSchedule = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    adam: AdamConfig = AdamConfig()
    grad_normalization: GradNormalization = "num_loss_tokens"

    def learning_rate(self, step: int) -> float:
        """The rate of 0-based step `step` (`algorithms.schedules.learning_rate_at`)."""
        return learning_rate_at(
            step,
            peak=self.peak_lr,
            total_steps=self.total_steps,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
        )

    def adam_params(self, step: int) -> types.AdamParams:
        return types.AdamParams(learning_rate=self.learning_rate(step), **self.adam.model_dump())


class Segment(_Model):
    """Steps `start`..`end - 1` from data cursor `data_cursor`; then `save_state` under
    `checkpoint_name` when set."""

    job_id: str
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    data_cursor: int = Field(ge=0)
    checkpoint_name: str | None = None

    @property
    def first(self) -> int:
        return self.start

    @property
    def last(self) -> int:
        return self.end - 1


class StepRecord(_Model):
    """One optimizer step: the raw rows it consumed (in order), the cursor after it, metrics."""

    step: int
    epoch: int
    data_cursor: int
    row_indices: list[int]
    metrics: dict[str, float]


class SegmentResult(_Model):
    """What a segment did: its steps and, when it saved, the requested checkpoint name."""

    segment: Segment
    steps: list[StepRecord]
    saved_name: str | None = None

    @property
    def data_cursor(self) -> int:
        return self.steps[-1].data_cursor if self.steps else self.segment.data_cursor


@dataclass(frozen=True)
class SourcedBatch:
    """The batch at a cursor: its datums, the raw rows it consumed in stream order (dropped
    rows included), the cursor after it and the epoch of its first row."""

    batch: SFTBatch
    row_indices: tuple[int, ...]
    cursor_after: int
    epoch: int


class BatchSource(Protocol):
    """The batch that starts at a raw-row cursor: a pure function of the cursor."""

    def batch(self, cursor: int) -> SourcedBatch: ...


StepCallback = Callable[[StepRecord], None]


def run_sft_step(
    trainer: FiretitanTrainingClient,
    step: int,
    batch: SFTBatch,
    optimizer: OptimizerPlan,
    timeout_s: float,
) -> dict[str, float]:
    """`forward_backward` (server cross-entropy) + `optim_step`; the step's metrics."""
    if not batch.datums:
        raise ValueError(f"step {step}: every row of the batch was dropped (max_seq_len?)")
    datums = list(batch.datums)
    started = time.monotonic()
    fwd_bwd_future = trainer.forward_backward(datums, "cross_entropy")
    optim_future = trainer.optim_step(
        optimizer.adam_params(step), grad_accumulation_normalization=optimizer.grad_normalization
    )
    fwd_bwd = fwd_bwd_future.result(timeout=timeout_s)
    fwd_bwd_s = time.monotonic() - started
    optim = optim_future.result(timeout=timeout_s)
    elapsed = time.monotonic() - started
    ce_loss = mean_ce_loss(fwd_bwd.metrics["loss:sum"], datums)
    tokens = float(sum(datum.model_input.length for datum in datums))
    return {
        "train/ce_loss": ce_loss,
        "train/loss": ce_loss,
        "train/ppl": _safe_exp(ce_loss),
        "train/lr": optimizer.learning_rate(step),
        "train/grad_norm": float((optim.metrics or {}).get("grad_norm:mean", float("nan"))),
        "train/step_tokens": tokens,
        "train/tokens_per_sec": tokens / elapsed if elapsed > 0 else 0.0,
        "train/tokens_per_sec_fwd_bwd": tokens / fwd_bwd_s if fwd_bwd_s > 0 else 0.0,
        "perf/fwd_bwd_time": fwd_bwd_s,
        "perf/optim_step_time": elapsed - fwd_bwd_s,
    }


def _safe_exp(value: float) -> float:
    return math.exp(min(value, 50.0))  # a perplexity, not an overflow


@task(
    name="train-segment",
    task_run_name="train steps {segment.first}–{segment.last}",
    retries=0,  # ordered trainer operations: never repeated in place (prefect.md §2)
    cache_policy=NO_CACHE,  # holds the live training client
    timeout_seconds=LONG_TIMEOUT_S,
)
def train_segment(
    trainer: FiretitanTrainingClient,
    segment: Segment,
    batches: BatchSource,
    optimizer: OptimizerPlan,
    waits: Waits,
    on_step: StepCallback | None = None,
) -> SegmentResult:
    """Run the segment's optimizer steps, then save resumable state if the segment says so."""
    records: list[StepRecord] = []
    cursor = segment.data_cursor
    for step in range(segment.start, segment.end):
        sourced = batches.batch(cursor)
        with trainer_call(segment.job_id, "an optimizer step", step):
            metrics = run_sft_step(trainer, step, sourced.batch, optimizer, waits.step_timeout_s)
        record = StepRecord(
            step=step,
            epoch=sourced.epoch,
            data_cursor=sourced.cursor_after,
            row_indices=list(sourced.row_indices),
            metrics=metrics,
        )
        records.append(record)
        cursor = sourced.cursor_after
        if on_step is not None:
            on_step(record)
    if segment.checkpoint_name is not None:
        with trainer_call(segment.job_id, f"save_state {segment.checkpoint_name}", segment.last):
            trainer.save_state(segment.checkpoint_name, timeout=waits.save_timeout_s)
    return SegmentResult(segment=segment, steps=records, saved_name=segment.checkpoint_name)


@task(
    name="evaluate-loss",
    task_run_name="eval loss at step {step}",
    retries=0,  # shares the training client's ordered session
    cache_policy=NO_CACHE,
    timeout_seconds=SHORT_TIMEOUT_S,
)
def evaluate_loss(
    trainer: FiretitanTrainingClient,
    datums: Sequence[types.Datum],
    step: int,
    job_id: str,
    waits: Waits,
) -> dict[str, float]:
    """Forward-only cross-entropy on the eval datums (no optimizer state touched, §12)."""
    with trainer_call(job_id, "an evaluation forward", step):
        output = trainer.forward(list(datums), "cross_entropy").result(timeout=waits.step_timeout_s)
    loss = mean_ce_loss(output.metrics["loss:sum"], datums)
    tokens = float(sum(datum.model_input.length for datum in datums))
    return {"eval/loss": loss, "eval/ppl": _safe_exp(loss), "eval/tokens": tokens}
