"""The DPO flow: direct preference optimisation against a frozen reference, as a Prefect flow.

The algorithm, per optimizer step t (a batch of preference pairs; for each side y of a pair,
lp_k(y) the log-probability of its k-th target, and k0 = max(0, response_start - 1) the first
target that predicts a token where the two sides differ):

    logπ(y)  = Σ_{k ≥ k0} lp_k(y)                       (policy; logπ_ref: the base model)
    margin   = (logπ(chosen) - logπ_ref(chosen)) - (logπ(rejected) - logπ_ref(rejected))
    loss     = mean over the pairs of -log sigmoid(β · margin)
    step     = forward_backward_custom([c0, r0, c1, r1, …], loss); optim_step(AdamW(lr_t), None)

The loss is already a mean, so `optim_step` takes no normalisation. The reference sums cost a
forward pass of a frozen base-only model on the same trainer, so they are computed once per
pair, before the first step, and kept in the run's durable step-inputs log: a resumed attempt
reads them back and computes only the pairs the log lacks; the reference is unloaded once the
cache is complete. The pairs at a data cursor are a pure function of (seed, cursor), so a
resume continues from the exact pair the lost attempt had reached. The orchestration is the
shared one in `flows/recipe_loop.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefect import Flow, flow

from algorithms.optimizer import OptimizerPlan
from algorithms.preference import RenderedPair, pair_datums
from algorithms.preference_losses import dpo_loss, eval_metrics, logprobs_of
from flows.config import DPOConfig
from flows.failures import final_unless_retry_helps
from flows.lifecycle import RunResult
from flows.monitoring import ProgressCallback, progress_listener
from flows.notices import notice
from flows.preference_data import (
    PairBatch,
    PairBatches,
    RenderedPreference,
    load_preference_data,
    render_preference_data,
)
from flows.recipe_loop import Attempt, RecipePlan, run_recipe
from flows.step_inputs import StepInputsLog
from tasks.errors import trainer_call
from tasks.reference import reference_logprob_sums
from tasks.training import RecipeStep, StepInputs, client_loss_step, forward_logprobs

if TYPE_CHECKING:
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "DPOBatch",
    "DPOConfig",
    "DPOStep",
    "ReferenceCache",
    "configured_dpo_flow",
    "dpo_flow",
    "run_dpo",
]

RefSums = tuple[float, float]  # the reference's (Σ chosen, Σ rejected) of one pair


class ReferenceCache:
    """The reference sums of every training and eval pair, kept in the step-inputs log.

    A key names the pair's row and a digest of its tokens (`ref:<row>:<digest>`, eval pairs
    `ref-eval:<row>:<digest>`): a log entry is never applied to a pair it was not computed
    for, even when a resume evaluates on another eval set.
    """

    def __init__(self, log: StepInputsLog, rendered: RenderedPreference) -> None:
        self.log = log
        self._train = [_key("ref", row, pair) for row, pair in enumerate(rendered.train)]
        self._eval = [_key("ref-eval", row, pair) for row, pair in enumerate(rendered.eval)]
        self._pairs = dict(
            zip(self._train + self._eval, rendered.train + rendered.eval, strict=True)
        )

    def __len__(self) -> int:
        return len(self._pairs)

    def missing(self) -> list[tuple[str, RenderedPair]]:
        """The pairs whose sums the log lacks, training rows first, in row order."""
        return [(key, pair) for key, pair in self._pairs.items() if key not in self.log]

    def train_sums(self, rows: Sequence[int]) -> tuple[RefSums, ...]:
        return tuple(self._sums(self._train[row]) for row in rows)

    def eval_sums(self) -> tuple[RefSums, ...]:
        return tuple(self._sums(key) for key in self._eval)

    def _sums(self, key: str) -> RefSums:
        chosen, rejected = self.log.get(key)
        return float(chosen), float(rejected)


def _key(prefix: str, row: int, pair: RenderedPair) -> str:
    tokens = json.dumps([pair.chosen, pair.rejected, pair.response_start], separators=(",", ":"))
    return f"{prefix}:{row}:{hashlib.sha256(tokens.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class DPOBatch:
    """The pairs of one step and the reference sums of each, read from the cache."""

    pairs: PairBatch
    reference: tuple[RefSums, ...]


class DPOStep(RecipeStep[DPOBatch]):
    """One DPO optimizer step: the DPO loss on the batch's pairs, then AdamW."""

    headline_metric = DPOConfig.headline_metric

    def __init__(
        self,
        batches: PairBatches,
        cache: ReferenceCache,
        optimizer: OptimizerPlan,
        beta: float,
    ) -> None:
        self.batches, self.cache, self.optimizer, self.beta = batches, cache, optimizer, beta

    def inputs(self, step: int, cursor: int) -> StepInputs[DPOBatch]:
        batch = self.batches.batch(cursor)
        reference = self.cache.train_sums(batch.data.row_indices)
        return StepInputs(
            DPOBatch(batch.data, reference), batch.row_indices, batch.cursor_after, batch.epoch
        )

    def train(
        self, trainer: FiretitanTrainingClient, step: int, data: DPOBatch, timeout_s: float
    ) -> dict[str, float]:
        datums = [datum for pair in data.pairs.pairs for datum in pair_datums(pair)]
        loss = dpo_loss(self.beta, data.reference, data.pairs.response_starts)
        return client_loss_step(trainer, step, datums, loss, self.optimizer, timeout_s)

    def inputs_position(self) -> int | None:
        return self.cache.log.position


@flow(
    name="dpo",
    flow_run_name="dpo-{config.run_name}",
    retries=2,  # preemption recovery; each attempt writes the config's onto its flow run
    retry_delay_seconds=30,
    persist_result=False,  # the ledger is the durable record, not Prefect results
)
def dpo_flow(config: DPOConfig) -> RunResult:
    """Train `config.base_model` on preference pairs with DPO; resumable, reporting a
    `RunResult`. A failure no retry can fix ends the flow run at once."""
    with final_unless_retry_helps():
        data = load_preference_data(config)  # a bad pair fails before any trainer exists

        def prepare(attempt: Attempt) -> RecipePlan:
            rendered = render_preference_data(data, attempt.session.renderer, config)
            cache = ReferenceCache(StepInputsLog(config.resolved_run_dir), rendered)
            _fill_reference_cache(attempt, cache, config)
            batches = PairBatches(rendered.train, config)
            step = DPOStep(batches, cache, config.optimizer_plan("none"), config.beta)
            evaluation = PairBatch(tuple(range(len(rendered.eval))), rendered.eval)
            return RecipePlan(step, lambda point: _evaluate(attempt, cache, evaluation, point))

        return run_recipe(config, dataset_fingerprint=data.fingerprint, prepare=prepare)


def _fill_reference_cache(attempt: Attempt, cache: ReferenceCache, config: DPOConfig) -> None:
    """Compute the reference sums the log lacks, `ref_batch_size` pairs per forward, each
    batch logged durably before the next is sent (a preempted build keeps what it finished);
    then unload the reference if the config says so."""
    run, session = attempt.run, attempt.session
    if (last := run.ledger.last_checkpoint()) is not None:
        cache.log.check_position(last.inputs_position, f"checkpoint {last.name}")
    missing = cache.missing()
    if missing:
        with trainer_call(run.job_id, "creating the reference model"):
            reference = session.service.create_base_training_client(config.base_model)
        for start in range(0, len(missing), config.ref_batch_size):
            batch = missing[start : start + config.ref_batch_size]
            label = f"pairs {start + 1}-{start + len(batch)} of {len(missing)}"
            pairs = [pair for _, pair in batch]
            sums = reference_logprob_sums(reference, pairs, label, run.job_id, run.waits)
            cache.log.append({key: list(s) for (key, _), s in zip(batch, sums, strict=True)})
        if config.release_reference_after_cache:
            with trainer_call(run.job_id, "unloading the reference model"):
                reference.unload_model().result(timeout=run.waits.step_timeout_s)
    notice(
        f"reference log-probabilities: {len(missing)} pairs computed, "
        f"{len(cache) - len(missing)} read from {cache.log.path}"
    )


def _evaluate(
    attempt: Attempt, cache: ReferenceCache, pairs: PairBatch, point: int
) -> dict[str, float]:
    """The DPO loss, accuracy and margin on the held-out pairs, by a forward pass only."""
    if not pairs.pairs:
        return {}
    config = attempt.run.config
    assert isinstance(config, DPOConfig)
    datums = [datum for pair in pairs.pairs for datum in pair_datums(pair)]
    run = attempt.run
    outputs = forward_logprobs(attempt.session.client, datums, point, run.job_id, run.waits)
    loss = dpo_loss(config.beta, cache.eval_sums(), pairs.response_starts)
    return eval_metrics(loss, datums, logprobs_of(outputs))


def configured_dpo_flow(config: DPOConfig) -> Flow[[DPOConfig], RunResult]:
    """`dpo_flow` with the config's flow retries and retry delay from its first moment
    (the flow writes them onto its run itself once training starts, for deployments)."""
    return dpo_flow.with_options(
        retries=config.flow_retries, retry_delay_seconds=config.retry_delay_s
    )


def run_dpo(config: DPOConfig, on_progress: ProgressCallback | None = None) -> RunResult:
    """Run the DPO flow in this process; `on_progress` is called after every optimizer step."""
    with progress_listener(on_progress):
        return configured_dpo_flow(config)(config)
