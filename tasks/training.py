"""The training segment: a recipe's optimizer steps between two cadence points, then the save.

One task run per segment, never one per step, so the Prefect UI shows a task wherever something
durable or observable happens; the save's read-back from the control plane (the name the ledger
records) is part of it rather than a task run of its own. A segment sends ordered trainer
operations, so it is never retried in place (`retries=0`): a failure mid-segment leaves the
outcome of its last step unknown, and recovery is the flow retry, which reloads the last
resumable checkpoint of the ledger and replays the segment. The segment knows nothing of any
recipe: a `RecipeStep` says what the inputs of the step at a data cursor are and how to train
one step on them. Recovery is exact when those inputs are a pure function of the cursor (SFT,
DPO and ORPO batches) or are read back from the run's durable step-inputs log (what a recipe
sampled or computed).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field
from tinker import types

from algorithms.datums import mean_ce_loss
from algorithms.optimizer import OptimizerPlan
from tasks.checkpoints import confirmed_checkpoint_name
from tasks.errors import trainer_call
from tasks.platform import PlatformEndpoint, Waits
from tasks.policy import LONG_TIMEOUT_S

if TYPE_CHECKING:
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "CustomLossFn",
    "RecipeStep",
    "Segment",
    "SegmentResult",
    "StepInputs",
    "StepRecord",
    "client_loss_step",
    "evaluate_loss",
    "forward_logprobs",
    "safe_exp",
    "step_metrics",
    "train_segment",
]

T = TypeVar("T")
# A loss over per-target log-probabilities, computed on the client: (loss, metrics).
CustomLossFn = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Segment(_Model):
    """Steps `start`..`end - 1` from data cursor `data_cursor`; then `save_state` under
    `checkpoint_name` when set (`known_checkpoints`: the names the job held before, which
    tell a renamed save apart)."""

    job_id: str
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    data_cursor: int = Field(ge=0)
    checkpoint_name: str | None = None
    known_checkpoints: tuple[str, ...] = ()

    @property
    def first(self) -> int:
        return self.start

    @property
    def last(self) -> int:
        return self.end - 1


class StepRecord(_Model):
    """One optimizer step: the raw rows it consumed (in order), the cursor after it, metrics,
    and where the run's step-inputs log stood after it (None: the recipe keeps none)."""

    step: int
    epoch: int
    data_cursor: int
    row_indices: list[int]
    metrics: dict[str, float]
    inputs_position: int | None = None


class SegmentResult(_Model):
    """What a segment did: its steps and, when it saved, the requested checkpoint name and
    the name the control plane lists the save under (`confirmed_name`: what the ledger
    records; the same unless the trainer renamed it)."""

    segment: Segment
    steps: list[StepRecord]
    saved_name: str | None = None
    confirmed_name: str | None = None

    @property
    def data_cursor(self) -> int:
        return self.steps[-1].data_cursor if self.steps else self.segment.data_cursor


@dataclass(frozen=True)
class StepInputs(Generic[T]):
    """The inputs of the step at a cursor: the recipe's own `data`, the raw rows consumed in
    stream order (dropped rows included), the cursor after them and the epoch of the first."""

    data: T
    row_indices: tuple[int, ...]
    cursor_after: int
    epoch: int


class RecipeStep(ABC, Generic[T]):
    """How a recipe trains: the inputs of the step at a data cursor, and one optimizer step.

    A subclass is a plain class on purpose (no dataclass, no pydantic): Prefect walks those
    task arguments, and a step holds the whole rendered dataset. `headline_metric` is the
    metric a person watches (the progress line, the segment table).
    """

    headline_metric: ClassVar[str]

    @abstractmethod
    def inputs(self, step: int, cursor: int) -> StepInputs[T]:
        """The inputs of 0-based step `step`, starting at raw-row cursor `cursor`."""

    @abstractmethod
    def train(
        self, trainer: FiretitanTrainingClient, step: int, data: T, timeout_s: float
    ) -> dict[str, float]:
        """One optimizer step on `data` (forward/backward, then `optim_step`); its metrics."""

    def inputs_position(self) -> int | None:
        """Where the run's step-inputs log stands (None: inputs are a function of the cursor)."""
        return None


StepCallback = Callable[[StepRecord], None]


def client_loss_step(
    trainer: FiretitanTrainingClient,
    step: int,
    datums: list[types.Datum],
    loss_fn: CustomLossFn,
    optimizer: OptimizerPlan,
    timeout_s: float,
) -> dict[str, float]:
    """One optimizer step on a loss computed on the client, which is already a mean:
    `forward_backward_custom(datums, loss_fn)`, then `optim_step` with no normalisation (a
    count would divide the mean again). The loss's own `train/*` metrics and `step_metrics`."""
    assert optimizer.grad_normalization == "none", optimizer.grad_normalization
    started = time.monotonic()
    fwd_bwd = trainer.forward_backward_custom(datums, loss_fn).result(timeout=timeout_s)
    fwd_bwd_s = time.monotonic() - started
    optim = trainer.optim_step(
        optimizer.adam_params(step), grad_accumulation_normalization=None
    ).result(timeout=timeout_s)
    elapsed = time.monotonic() - started
    closure = {k: v for k, v in fwd_bwd.metrics.items() if k.startswith("train/")}
    return closure | step_metrics(datums, optimizer, step, optim, fwd_bwd_s, elapsed)


def step_metrics(
    datums: Sequence[types.Datum],
    optimizer: OptimizerPlan,
    step: int,
    optim: types.OptimStepResponse,
    fwd_bwd_s: float,
    elapsed_s: float,
) -> dict[str, float]:
    """What every recipe reports of a step besides its loss: the rate, the gradient norm
    before clipping, tokens and throughput, and where the time went."""
    tokens = float(sum(datum.model_input.length for datum in datums))
    return {
        "train/lr": optimizer.learning_rate(step),
        "train/grad_norm": float((optim.metrics or {}).get("grad_norm:mean", math.nan)),
        "train/step_tokens": tokens,
        "train/tokens_per_sec": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "train/tokens_per_sec_fwd_bwd": tokens / fwd_bwd_s if fwd_bwd_s > 0 else 0.0,
        "train/step_time_sec": elapsed_s,
        "perf/fwd_bwd_time": fwd_bwd_s,
        "perf/optim_step_time": elapsed_s - fwd_bwd_s,
    }


def safe_exp(value: float) -> float:
    """`exp`, capped: a perplexity, not an overflow."""
    return math.exp(min(value, 50.0))


@task(
    name="train-segment",
    task_run_name="train steps {segment.first}-{segment.last}",
    retries=0,  # ordered trainer operations: never repeated in place
    cache_policy=NO_CACHE,  # holds the live training client
    timeout_seconds=LONG_TIMEOUT_S,
)
def train_segment(
    trainer: FiretitanTrainingClient,
    segment: Segment,
    recipe: RecipeStep[Any],
    endpoint: PlatformEndpoint,
    on_step: StepCallback | None = None,
) -> SegmentResult:
    """Run the segment's optimizer steps, then save resumable state if the segment says so
    and read back from the control plane the name the save is listed under."""
    waits = endpoint.waits
    records: list[StepRecord] = []
    cursor = segment.data_cursor
    for step in range(segment.start, segment.end):
        inputs = recipe.inputs(step, cursor)
        with trainer_call(segment.job_id, "an optimizer step", step):
            metrics = recipe.train(trainer, step, inputs.data, waits.step_timeout_s)
        record = StepRecord(
            step=step,
            epoch=inputs.epoch,
            data_cursor=inputs.cursor_after,
            row_indices=list(inputs.row_indices),
            metrics=metrics,
            inputs_position=recipe.inputs_position(),
        )
        records.append(record)
        cursor = inputs.cursor_after
        if on_step is not None:
            on_step(record)
    if segment.checkpoint_name is None:
        return SegmentResult(segment=segment, steps=records)
    with trainer_call(segment.job_id, f"save_state {segment.checkpoint_name}", segment.last):
        trainer.save_state(segment.checkpoint_name, timeout=waits.save_timeout_s)
    # Read-only: a failure here fails the attempt like a lost save, and the replay saves under
    # a fresh name (the job may hold this one already).
    confirmed = confirmed_checkpoint_name(
        endpoint, segment.job_id, segment.checkpoint_name, segment.known_checkpoints
    )
    return SegmentResult(
        segment=segment,
        steps=records,
        saved_name=segment.checkpoint_name,
        confirmed_name=confirmed,
    )


def evaluate_loss(
    trainer: FiretitanTrainingClient,
    datums: Sequence[types.Datum],
    step: int,
    job_id: str,
    waits: Waits,
) -> dict[str, float]:
    """Forward-only cross-entropy on the eval datums (no optimizer state is touched). A plain
    function: it runs inside the point's evaluation task (`tasks.evaluation.evaluate_point`)."""
    with trainer_call(job_id, "an evaluation forward", step):
        output = trainer.forward(list(datums), "cross_entropy").result(timeout=waits.step_timeout_s)
    loss = mean_ce_loss(output.metrics["loss:sum"], datums)
    tokens = float(sum(datum.model_input.length for datum in datums))
    return {"eval/loss": loss, "eval/ppl": safe_exp(loss), "eval/tokens": tokens}


def forward_logprobs(
    trainer: FiretitanTrainingClient,
    datums: Sequence[types.Datum],
    step: int,
    job_id: str,
    waits: Waits,
) -> list[dict[str, types.TensorData]]:
    """Forward only: each datum's per-target `logprobs` (and the loss's other outputs), for a
    loss computed on the client; no gradient, no optimizer state touched. A plain function: it
    runs inside the point's evaluation task (`tasks.evaluation.evaluate_point`)."""
    with trainer_call(job_id, "a forward pass", step):
        output = trainer.forward(list(datums), "cross_entropy").result(timeout=waits.step_timeout_s)
    return [dict(outputs) for outputs in output.loss_fn_outputs]
