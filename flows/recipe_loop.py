"""The run machinery every recipe shares: one attempt, from provisioning to `run_end`.

A recipe hands `run_recipe` its config, the fingerprint of its data and a `prepare` function
that, given the live attempt, returns the recipe's `RecipeStep` (how to get a step's inputs and
train one step on them) and its evaluation. Everything else is the same for every recipe:

    open the run → (already finished? report it) → provision the trainer and deployment →
    connect → prepare → resume from the ledger → per segment: train the segment's steps (one
    task, the save and its read-back at its end) → hotload by cadence → record the checkpoint →
    evaluate → report (artifacts, once per point) → run_end

A lost trainer fails the attempt and the flow retry runs all of it again: a fresh session and
syncer (so a `base` hotload comes first), the ledger's last checkpoint, the same data cursor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flows.cadence import Cadence
from flows.config import RecipeConfig
from flows.lifecycle import RunContext, RunResult, open_run
from flows.scheduling import apply_retry_policy
from flows.session import ResumePoint, TrainerSession, provision, resume
from tasks.evaluation import evaluate_point
from tasks.provision import TrainerSpec
from tasks.training import RecipeStep, Segment, train_segment
from tasks.weight_sync import HotloadResult, save_and_hotload

__all__ = ["Attempt", "Evaluate", "Prepare", "RecipePlan", "run_recipe", "snapshot_name"]

Evaluate = Callable[[int], Mapping[str, float]]


@dataclass(frozen=True)
class RecipePlan:
    """What a recipe trains with: its step, and its evaluation at a cadence point (the
    metrics of the weights after that many steps; empty: nothing to report)."""

    step: RecipeStep[Any]
    evaluate: Evaluate | None = None


@dataclass(frozen=True)
class Attempt:
    """The live attempt a recipe prepares with: the run (ledger, monitors, ids) and the
    session (trainer client, tokenizer, syncer, sampler)."""

    run: RunContext
    session: TrainerSession

    def sync(self, point: int, *, announce: bool = True) -> HotloadResult:
        """Save, hotload and verify the weights after `point` steps, and record the hotload
        (`announce`: tell the person running the flow). The syncer picks `base` or `delta`."""
        assert self.session.syncer is not None, "the run has no deployment"
        hotload = save_and_hotload(
            self.session.syncer, snapshot_name(point), point, self.run.job_id
        )
        self.run.record_hotload(hotload, announce=announce)
        return hotload

    def serve(self, point: int) -> None:
        """Make the deployment serve the weights after `point` steps, unless it already does
        (the syncer verified them at this point)."""
        synced = self.session.syncer.last_synced if self.session.syncer is not None else None
        if synced is None or synced.name != snapshot_name(point):
            self.sync(point)


Prepare = Callable[[Attempt], RecipePlan]


def snapshot_name(point: int) -> str:
    return f"step-{point}"


def run_recipe(config: RecipeConfig, *, dataset_fingerprint: str, prepare: Prepare) -> RunResult:
    """One attempt of the run `config` names (see the module docstring)."""
    # The config's flow retries, not the decorator's, decide whether a failure is retried,
    # for a deployment run too.
    apply_retry_policy(config.flow_retries, config.retry_delay_s)
    with open_run(config, dataset_fingerprint=dataset_fingerprint) as run:
        if (finished := run.finished()) is not None:
            return finished  # its ledger already ends: nothing to redo
        trainer = TrainerSpec(
            job_id=run.job_id,
            base_model=config.base_model,
            lora_rank=config.lora_rank,
            display_name=config.run_name,
        )
        resources = provision(run.endpoint, trainer, run.deployment_id)
        with TrainerSession.open(
            run.endpoint,
            resources,
            base_model=config.base_model,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            seed=config.seed,
            tokenizer_model=config.tokenizer_model,
        ) as session:
            attempt = Attempt(run, session)
            plan = prepare(attempt)
            point = resume(run.endpoint, run.ledger, session, config.init_from_checkpoint)
            return _train(attempt, plan, point)


def _train(attempt: Attempt, plan: RecipePlan, point: ResumePoint) -> RunResult:
    """The segments from the resume point to the end, each followed by its cadence work."""
    run, config = attempt.run, attempt.run.config
    cadence = Cadence(
        max_steps=config.max_steps,
        checkpoint_every=config.checkpoint_every,
        hotload_every=config.hotload_interval,
        eval_every=config.eval_every,
        has_deployment=config.needs_deployment,
        sample_eval=config.samples_in_eval,
    )
    run.taken_names |= point.job_checkpoints
    run.monitor.start(point.next_step)
    if cadence.eval_at(point.next_step) and not run.evaluated(point.next_step):
        _evaluate(run, plan, point.next_step)  # the "before" metrics
        run.report()
    cursor = point.data_cursor
    for start, end in cadence.segments(point.next_step):
        saves = cadence.checkpoint_at(end)  # a resumable save ends this segment
        segment = Segment(
            job_id=run.job_id,
            start=start,
            end=end,
            data_cursor=cursor,
            checkpoint_name=run.checkpoint_name(end) if saves else None,
            known_checkpoints=tuple(sorted(run.taken_names)) if saves else (),
        )
        result = train_segment(
            attempt.session.client, segment, plan.step, run.endpoint, run.monitor.on_step
        )
        run.monitor.record_segment(result)
        run.final_metrics.update(result.steps[-1].metrics)
        cursor = result.data_cursor
        eval_due = cadence.eval_at(end) and not run.evaluated(end)
        snapshot = None
        if cadence.hotload_at(end, eval_due=eval_due):
            snapshot = attempt.sync(end, announce=saves or eval_due).identity
        if result.saved_name is not None:
            run.record_checkpoint(result, snapshot)
        if eval_due:
            _evaluate(run, plan, end)
        if end < config.max_steps:
            run.report()  # the last point's report is the run's final one (`complete`)
    return run.complete(config.max_steps, cursor)


def _evaluate(run: RunContext, plan: RecipePlan, point: int) -> None:
    if plan.evaluate is None:
        return
    metrics = evaluate_point(plan.evaluate, point)  # one task run for the whole evaluation
    if metrics:
        run.record_evaluation(point, metrics)
