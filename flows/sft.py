"""The SFT flow (recipes.md §5): supervised fine-tuning as a Prefect flow, end to end.

provision → resume → loop (train segment, hotload, checkpoint, evaluate) → run_end →
teardown. The flow body reads like the recipe; the lifecycle it shares with DPO, ORPO and RL
lives in `flows/lifecycle.py` and `flows/session.py`, the math in `algorithms/`. Recovery
from preemption is the flow retry: the next attempt reconnects to the same trainer job and
resumes from the ledger's last resumable checkpoint, on the same rows, with a `base` hotload
first. `run_sft` is the entry point for callers in this process (the CLI).
"""

from __future__ import annotations

from prefect import Flow, flow

from algorithms.datums import grad_normalization
from flows.cadence import Cadence
from flows.config import SFTConfig
from flows.failures import final_unless_retry_helps
from flows.lifecycle import RunContext, RunResult, open_run
from flows.monitoring import Progress, ProgressCallback, progress_listener
from flows.session import TrainerSession, provision, resume
from flows.sft_data import RenderedSFT, SFTBatches, load_sft_data, render_sft_data
from tasks.evaluation import sample_greedy
from tasks.provision import TrainerSpec
from tasks.training import OptimizerPlan, Segment, evaluate_loss, train_segment
from tasks.weight_sync import HotloadResult, save_and_hotload

__all__ = [
    "Progress",
    "ProgressCallback",
    "RunResult",
    "SFTConfig",
    "configured_sft_flow",
    "run_sft",
    "sft_flow",
]


@flow(
    name="sft",
    flow_run_name="sft-{config.run_name}",
    retries=2,  # preemption recovery; `run_sft` applies the config's `flow_retries`
    retry_delay_seconds=30,
    persist_result=False,  # the ledger is the durable record, not Prefect results
)
def sft_flow(config: SFTConfig) -> RunResult:
    """Fine-tune `config.base_model` on `config.dataset`; resumable, reporting a `RunResult`.

    A failure no retry can fix (bad data or config, another run's ledger, a refused key) ends
    the flow run at once; lost trainers and transient faults get the flow retries.
    """
    with final_unless_retry_helps():
        return _train(config)


def _train(config: SFTConfig) -> RunResult:
    data = load_sft_data(config)  # a missing file or a bad row fails before any trainer exists
    cadence = Cadence(
        max_steps=config.max_steps,
        checkpoint_every=config.checkpoint_every,
        hotload_every=config.hotload_every,
        eval_every=config.eval_every,
        has_deployment=config.needs_deployment,
        sample_eval=config.sample_eval,
    )
    with open_run(
        config,
        recipe="sft",
        dataset_fingerprint=data.fingerprint,
        needs_deployment=config.needs_deployment,
        default_wandb_project="sft-tinker",
    ) as run:
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
            rendered = render_sft_data(data, session.renderer, config)
            point = resume(run.endpoint, run.ledger, session)
            run.taken_names |= point.job_checkpoints
            run.monitor.start(point.next_step)
            batches = SFTBatches(rendered.train, config)
            optimizer = _optimizer_plan(config)
            if cadence.eval_at(point.next_step) and not run.evaluated(point.next_step):
                _evaluate(run, session, rendered, point.next_step)  # "before" metrics
            cursor = point.data_cursor
            for start, end in cadence.segments(point.next_step):
                saves = cadence.checkpoint_at(end)  # a resumable save ends this segment
                segment = Segment(
                    job_id=run.job_id,
                    start=start,
                    end=end,
                    data_cursor=cursor,
                    checkpoint_name=run.checkpoint_name(end) if saves else None,
                )
                result = train_segment(
                    session.client, segment, batches, optimizer, run.waits, run.monitor.on_step
                )
                run.monitor.record_segment(result)
                run.final_metrics.update(result.steps[-1].metrics)
                cursor = result.data_cursor
                eval_due = cadence.eval_at(end) and not run.evaluated(end)
                snapshot = None
                if cadence.hotload_at(end, eval_due=eval_due):
                    snapshot = _sync(run, session, end).identity
                if result.saved_name is not None:
                    run.record_checkpoint(result, snapshot)
                if eval_due:
                    _evaluate(run, session, rendered, end)
            return run.complete(config.max_steps, cursor)


def _optimizer_plan(config: SFTConfig) -> OptimizerPlan:
    return OptimizerPlan(
        peak_lr=config.learning_rate,
        total_steps=config.max_steps,
        schedule=config.lr_schedule,
        warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio,
        adam=config.adam,
        grad_normalization=grad_normalization(config.loss_reduction),
    )


def _sync(run: RunContext, session: TrainerSession, point: int) -> HotloadResult:
    """Save, hotload and verify the weights after `point` steps, and record the hotload.

    The session's syncer picks the kind: a full `base` load first (every attempt has a fresh
    syncer, so a resume starts with one too), then deltas; LoRA adapters are always `base`.
    """
    assert session.syncer is not None
    hotload = save_and_hotload(session.syncer, _snapshot_name(point), point, run.job_id)
    run.record_hotload(hotload)
    return hotload


def _snapshot_name(point: int) -> str:
    return f"step-{point}"


def _serves(session: TrainerSession, point: int) -> bool:
    """Whether the deployment serves the weights after `point` steps (the syncer verified it)."""
    synced = session.syncer.last_synced if session.syncer is not None else None
    return synced is not None and synced.name == _snapshot_name(point)


def _evaluate(run: RunContext, session: TrainerSession, rendered: RenderedSFT, point: int) -> None:
    """Eval loss by a forward pass; exact match by sampling the deployment (hotloaded first)."""
    config = run.config
    assert isinstance(config, SFTConfig)
    metrics: dict[str, float] = {}
    if rendered.eval_datums:
        metrics |= evaluate_loss(session.client, rendered.eval_datums, point, run.job_id, run.waits)
    if config.sample_eval and session.sampler is not None and rendered.eval_prompts:
        if not _serves(session, point):
            _sync(run, session, point)
        completions = sample_greedy(
            session.sampler,
            rendered.eval_prompts,
            point,
            config.eval_max_tokens,
            run.waits.sample_timeout_s,
        )
        metrics["eval/exact_match"] = rendered.exact_match(completions)
    if metrics:
        run.record_evaluation(point, metrics)


def configured_sft_flow(config: SFTConfig) -> Flow[[SFTConfig], RunResult]:
    """`sft_flow` with the config's flow retries and retry delay."""
    return sft_flow.with_options(
        retries=config.flow_retries, retry_delay_seconds=config.retry_delay_s
    )


def run_sft(config: SFTConfig, on_progress: ProgressCallback | None = None) -> RunResult:
    """Run the SFT flow in this process; `on_progress` is called after every optimizer step."""
    with progress_listener(on_progress):
        return configured_sft_flow(config)(config)
