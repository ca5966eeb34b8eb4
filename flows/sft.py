"""The SFT flow: supervised fine-tuning as a Prefect flow, end to end.

The algorithm, per optimizer step t (a batch B of rendered chat rows, 0/1 weights w on the
tokens the config trains on):

    datums  = [tokens[:-1] → tokens[1:], weights[1:]] for each row in B
    loss    = Σ_i Σ_k w_ik · (-log p(x_ik | x_i,<k))   (server `cross_entropy`, a weighted sum)
    step    = forward_backward(datums, "cross_entropy"); optim_step(AdamW(lr_t), normalisation)

with the normalisation that pairs with `loss_reduction` (`batch_token_mean`: divide by Σ w over
the step). The batch at a data cursor is a pure function of (seed, cursor), so a replayed step
trains exactly the rows the lost one did. The orchestration (provision, resume, segments,
hotloads, checkpoints, evaluation, teardown) is the one every recipe shares, in
`flows/recipe_loop.py`. `run_sft` is the entry point for callers in this process (the CLI).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import Flow, flow

from algorithms.datums import SFTBatch, grad_normalization, mean_ce_loss
from algorithms.optimizer import OptimizerPlan
from flows.config import SFTConfig
from flows.failures import final_unless_retry_helps
from flows.lifecycle import RunResult
from flows.monitoring import Progress, ProgressCallback, progress_listener
from flows.recipe_loop import Attempt, RecipePlan, run_recipe
from flows.sft_data import RenderedSFT, SFTBatches, load_sft_data, render_sft_data
from tasks.evaluation import sample_greedy
from tasks.training import RecipeStep, StepInputs, evaluate_loss, safe_exp, step_metrics

if TYPE_CHECKING:
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "Progress",
    "ProgressCallback",
    "RunResult",
    "SFTConfig",
    "SFTStep",
    "configured_sft_flow",
    "run_sft",
    "sft_flow",
]


class SFTStep(RecipeStep[SFTBatch]):
    """One SFT optimizer step: server cross-entropy on the batch, then AdamW."""

    headline_metric = SFTConfig.headline_metric

    def __init__(self, batches: SFTBatches, optimizer: OptimizerPlan) -> None:
        self.batches, self.optimizer = batches, optimizer

    def inputs(self, step: int, cursor: int) -> StepInputs[SFTBatch]:
        return self.batches.batch(cursor)

    def train(
        self, trainer: FiretitanTrainingClient, step: int, data: SFTBatch, timeout_s: float
    ) -> dict[str, float]:
        if not data.datums:
            raise ValueError(f"step {step}: every row of the batch was dropped (max_seq_len?)")
        datums = list(data.datums)
        started = time.monotonic()
        fwd_bwd_future = trainer.forward_backward(datums, "cross_entropy")
        optim_future = trainer.optim_step(
            self.optimizer.adam_params(step),
            grad_accumulation_normalization=self.optimizer.grad_normalization,
        )
        fwd_bwd = fwd_bwd_future.result(timeout=timeout_s)
        fwd_bwd_s = time.monotonic() - started
        optim = optim_future.result(timeout=timeout_s)
        elapsed = time.monotonic() - started
        ce_loss = mean_ce_loss(fwd_bwd.metrics["loss:sum"], datums)  # Σ w·nll / Σ w
        return {
            "train/ce_loss": ce_loss,
            "train/loss": ce_loss,
            "train/ppl": safe_exp(ce_loss),
            **step_metrics(datums, self.optimizer, step, optim, fwd_bwd_s, elapsed),
        }


@flow(
    name="sft",
    flow_run_name="sft-{config.run_name}",
    retries=2,  # preemption recovery; each attempt writes the config's onto its flow run
    retry_delay_seconds=30,
    persist_result=False,  # the ledger is the durable record, not Prefect results
)
def sft_flow(config: SFTConfig) -> RunResult:
    """Fine-tune `config.base_model` on `config.dataset`; resumable, reporting a `RunResult`.

    A failure no retry can fix (bad data or config, another run's ledger, a refused key) ends
    the flow run at once; lost trainers and transient faults get the flow retries.
    """
    with final_unless_retry_helps():
        data = load_sft_data(config)  # a missing file or a bad row fails before any trainer

        def prepare(attempt: Attempt) -> RecipePlan:
            rendered = render_sft_data(data, attempt.session.renderer, config)
            optimizer = config.optimizer_plan(grad_normalization(config.loss_reduction))
            step = SFTStep(SFTBatches(rendered.train, config), optimizer)
            return RecipePlan(step, lambda point: _evaluate(attempt, rendered, point))

        return run_recipe(config, dataset_fingerprint=data.fingerprint, prepare=prepare)


def _evaluate(attempt: Attempt, rendered: RenderedSFT, point: int) -> dict[str, float]:
    """Eval loss by a forward pass; exact match by sampling the deployment (hotloaded first)."""
    run, session = attempt.run, attempt.session
    config = run.config
    assert isinstance(config, SFTConfig)
    metrics: dict[str, float] = {}
    if rendered.eval_datums:
        metrics |= evaluate_loss(session.client, rendered.eval_datums, point, run.job_id, run.waits)
    if config.sample_eval and session.sampler is not None and rendered.eval_prompts:
        attempt.serve(point)
        completions = sample_greedy(
            session.sampler,
            rendered.eval_prompts,
            point,
            config.eval_max_tokens,
            run.waits.sample_timeout_s,
        )
        metrics["eval/exact_match"] = rendered.exact_match(completions)
    return metrics


def configured_sft_flow(config: SFTConfig) -> Flow[[SFTConfig], RunResult]:
    """`sft_flow` with the config's flow retries and retry delay from its first moment
    (the flow writes them onto its run itself once training starts, for deployments)."""
    return sft_flow.with_options(
        retries=config.flow_retries, retry_delay_seconds=config.retry_delay_s
    )


def run_sft(config: SFTConfig, on_progress: ProgressCallback | None = None) -> RunResult:
    """Run the SFT flow in this process; `on_progress` is called after every optimizer step."""
    with progress_listener(on_progress):
        return configured_sft_flow(config)(config)
