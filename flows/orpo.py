"""The ORPO flow: odds-ratio preference optimisation as a Prefect flow, with no reference model.

The algorithm, per optimizer step t (a batch of preference pairs; for each side y of a pair,
lp_k(y) the log-probability of its k-th target, and k0 = max(0, response_start - 1) the first
target that predicts a token where the two sides differ):

    a_y     = mean_{k ≥ k0} lp_k(y)                     (length-normalised, unlike DPO)
    logodds = a - log(1 - e^a),  a clamped to [-50, -1e-6] so both ends stay finite
    L_pair  = -a_chosen + λ · (-log sigmoid(logodds(a_chosen) - logodds(a_rejected)))
    loss    = mean over the pairs (or their sum, `pair_reduction="sum"`, as the cookbook does)
    step    = forward_backward_custom([c0, r0, c1, r1, …], loss); optim_step(AdamW(lr_t), None)

The loss is already a mean, so `optim_step` takes no normalisation. The pairs at a data cursor
are a pure function of (seed, cursor), so a resume continues from the exact pair the lost
attempt had reached (the reference cookbook restarts its data order) and a replayed step trains
the same pairs. The orchestration is the shared one in `flows/recipe_loop.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import Flow, flow

from algorithms.optimizer import OptimizerPlan
from algorithms.preference import pair_datums
from algorithms.preference_losses import PairReduction, eval_metrics, logprobs_of, orpo_loss
from flows.config import ORPOConfig
from flows.failures import final_unless_retry_helps
from flows.lifecycle import RunResult
from flows.monitoring import ProgressCallback, progress_listener
from flows.preference_data import (
    PairBatch,
    PairBatches,
    load_preference_data,
    render_preference_data,
)
from flows.recipe_loop import Attempt, RecipePlan, run_recipe
from tasks.training import RecipeStep, StepInputs, client_loss_step, forward_logprobs

if TYPE_CHECKING:
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = ["ORPOConfig", "ORPOStep", "configured_orpo_flow", "orpo_flow", "run_orpo"]


class ORPOStep(RecipeStep[PairBatch]):
    """One ORPO optimizer step: the odds-ratio loss on the batch's pairs, then AdamW."""

    headline_metric = ORPOConfig.headline_metric

    def __init__(
        self,
        batches: PairBatches,
        optimizer: OptimizerPlan,
        orpo_lambda: float,
        pair_reduction: PairReduction,
    ) -> None:
        self.batches, self.optimizer = batches, optimizer
        self.orpo_lambda, self.pair_reduction = orpo_lambda, pair_reduction

    def inputs(self, step: int, cursor: int) -> StepInputs[PairBatch]:
        return self.batches.batch(cursor)

    def train(
        self, trainer: FiretitanTrainingClient, step: int, data: PairBatch, timeout_s: float
    ) -> dict[str, float]:
        datums = [datum for pair in data.pairs for datum in pair_datums(pair)]
        loss = orpo_loss(self.orpo_lambda, data.response_starts, self.pair_reduction)
        return client_loss_step(trainer, step, datums, loss, self.optimizer, timeout_s)


@flow(
    name="orpo",
    flow_run_name="orpo-{config.run_name}",
    retries=2,  # preemption recovery; each attempt writes the config's onto its flow run
    retry_delay_seconds=30,
    persist_result=False,  # the ledger is the durable record, not Prefect results
)
def orpo_flow(config: ORPOConfig) -> RunResult:
    """Train `config.base_model` on preference pairs with ORPO; resumable, reporting a
    `RunResult`. A failure no retry can fix ends the flow run at once."""
    with final_unless_retry_helps():
        data = load_preference_data(config)  # a bad pair fails before any trainer exists

        def prepare(attempt: Attempt) -> RecipePlan:
            rendered = render_preference_data(data, attempt.session.renderer, config)
            step = ORPOStep(
                PairBatches(rendered.train, config),
                config.optimizer_plan("none"),
                config.orpo_lambda,
                config.pair_reduction,
            )
            evaluation = PairBatch(tuple(range(len(rendered.eval))), rendered.eval)
            return RecipePlan(step, lambda point: _evaluate(attempt, evaluation, point))

        return run_recipe(config, dataset_fingerprint=data.fingerprint, prepare=prepare)


def _evaluate(attempt: Attempt, pairs: PairBatch, point: int) -> dict[str, float]:
    """The ORPO loss, accuracy and log-odds on the held-out pairs, by a forward pass only."""
    if not pairs.pairs:
        return {}
    config = attempt.run.config
    assert isinstance(config, ORPOConfig)
    datums = [datum for pair in pairs.pairs for datum in pair_datums(pair)]
    run = attempt.run
    outputs = forward_logprobs(attempt.session.client, datums, point, run.job_id, run.waits)
    loss = orpo_loss(config.orpo_lambda, pairs.response_starts, config.pair_reduction)
    return eval_metrics(loss, datums, logprobs_of(outputs))


def configured_orpo_flow(config: ORPOConfig) -> Flow[[ORPOConfig], RunResult]:
    """`orpo_flow` with the config's flow retries and retry delay from its first moment
    (the flow writes them onto its run itself once training starts, for deployments)."""
    return orpo_flow.with_options(
        retries=config.flow_retries, retry_delay_seconds=config.retry_delay_s
    )


def run_orpo(config: ORPOConfig, on_progress: ProgressCallback | None = None) -> RunResult:
    """Run the ORPO flow in this process; `on_progress` is called after every optimizer step."""
    with progress_listener(on_progress):
        return configured_orpo_flow(config)(config)
