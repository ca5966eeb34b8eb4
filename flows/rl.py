"""The RL flow: policy-gradient training on rewards of completions sampled from the live policy.

The algorithm, per optimizer step t (P prompt rows in row order, G completions each):

    rollouts  = G completions per prompt from the deployment (the policy of this window), each
                with its own seed and the sampler's log-probs π_inf; rewards r = reward(text, row)
    groups    = A_i = (r_i - mean r) / std r  (or r_i - mean r); groups of equal rewards dropped
    π_ref     = the base model's log-probs           (only when kl_beta > 0)
    π_old     = the policy's log-probs before the step (a forward, or π_inf, or the closure's own)
    loss      = token mean of the policy loss (GRPO, DAPO, GSPO, CISPO, DRO, IS, REINFORCE)
                + kl_beta · k3(π, π_ref)
    step      = forward_backward_custom(datums, loss); optim_step(AdamW(lr_t), None)
                (or the server's loss in one forward_backward with loss_path="builtin")

A window of `weight_sync_interval` steps samples all its rollouts at once from the weights at
its start; a verified hotload ends it. Rollouts are written to the run's durable step-inputs
log *before* their step trains, so a replay after a lost trainer trains on exactly what the
lost attempt sampled: a recovered run equals an uninterrupted one bit for bit. With
`max_offpolicy_versions` > 0 a producer keeps sampling up to that many versions ahead while
the trainer trains (`flows/rl_producer.py`). The orchestration is `flows/recipe_loop.py`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from prefect import Flow, flow

from algorithms.datasets import next_batch
from algorithms.datums import GradNormalization
from algorithms.optimizer import OptimizerPlan
from algorithms.preference_losses import logprobs_of
from algorithms.rl_builtin import BUILTIN_GRAD_NORMALIZATION, builtin_datums, builtin_loss
from algorithms.rl_inputs import RLBatch, RLSample
from algorithms.rl_losses import CLIENT_GRAD_NORMALIZATION, rl_loss
from algorithms.rl_rollouts import StepRollouts, training_batch
from algorithms.rollout_metrics import rollout_metrics
from flows.config import RLConfig
from flows.failures import final_unless_retry_helps
from flows.fanout import FanOut
from flows.lifecycle import RunResult
from flows.monitoring import ProgressCallback, progress_listener
from flows.recipe_loop import Attempt, RecipePlan, run_recipe
from flows.rl_data import (
    RenderedRL,
    RLData,
    RowScorer,
    TrajectoryWriter,
    eval_request,
    load_rl_data,
    render_rl_data,
)
from flows.rl_producer import snapshot_version
from flows.rl_sources import RolloutSource, rollout_source
from flows.step_inputs import StepInputsLog
from tasks.errors import trainer_call
from tasks.rollouts import sample_rollouts
from tasks.training import RecipeStep, StepInputs, client_loss_step, step_metrics

if TYPE_CHECKING:
    from tinker import types

    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "InferenceDriftError",
    "RLConfig",
    "RLStep",
    "configured_rl_flow",
    "rl_flow",
    "run_rl",
]


class InferenceDriftError(RuntimeError):
    """The sampler's log-probs drifted from the trainer's beyond `inference_kl_fail`: the
    deployment is not serving the weights being trained."""

    retryable: ClassVar[bool] = False


class RLStep(RecipeStep[StepRollouts]):
    """One RL optimizer step on a step's rollouts, read from the step-inputs log or sampled
    (and logged) first."""

    headline_metric = RLConfig.headline_metric

    def __init__(
        self,
        config: RLConfig,
        prompts: Sequence[Sequence[int]],
        log: StepInputsLog,
        source: RolloutSource,
        reference: FiretitanTrainingClient | None,
        trajectories: Callable[[StepRollouts], None] | None = None,
    ) -> None:
        self.config, self.prompts, self.log, self.source = config, prompts, log, source
        self.reference, self.trajectories = reference, trajectories
        normalization: GradNormalization = (
            CLIENT_GRAD_NORMALIZATION
            if config.loss_path == "client"
            else BUILTIN_GRAD_NORMALIZATION
        )
        self.optimizer: OptimizerPlan = config.optimizer_plan(normalization)

    def inputs(self, step: int, cursor: int) -> StepInputs[StepRollouts]:
        key = _log_key(step)
        if key not in self.log:
            sampled = self.source.rollouts(step, cursor)
            self.log.append({_log_key(s.step): s.model_dump(mode="json") for s in sampled})
        rollouts = StepRollouts.model_validate(self.log.get(key))
        first_row = next_batch(
            self.config.seed, cursor, 1, len(self.prompts), shuffle=self.config.shuffle
        )[0]
        if rollouts.rows and rollouts.rows[0].row != first_row[0]:
            raise RuntimeError(
                f"{self.log.path}: step {step}'s logged rollouts start at row "
                f"{rollouts.rows[0].row}, the data cursor {cursor} at row {first_row[0]}: "
                "the log belongs to another run"
            )
        return StepInputs(rollouts, rollouts.row_indices, rollouts.cursor_after, rollouts.epoch)

    def inputs_position(self) -> int | None:
        return self.log.position

    def train(
        self, trainer: FiretitanTrainingClient, step: int, data: StepRollouts, timeout_s: float
    ) -> dict[str, float]:
        started = time.monotonic()
        pass_k = (
            (self.config.completions_per_prompt,) if self.config.completions_per_prompt > 1 else ()
        )
        metrics = rollout_metrics(
            data.metric_groups(), sample_fails=data.sample_fails, pass_k=pass_k
        )
        metrics["train/lr"] = self.optimizer.learning_rate(step)
        metrics |= self.source.step_metrics(step) | _version_offsets(step, data)
        if self.trajectories is not None:
            self.trajectories(data)
        built = training_batch(data, self.prompts)
        if built.batch is None:  # every group filtered or failed: nothing to learn from
            metrics["train/skipped_step"] = 1.0
            self.source.trained(step)
            return metrics
        batch = self._anchored(trainer, built.datums, built.batch, timeout_s)
        parts = _minibatches(len(built.datums), self.config.ppo_n_minibatches)
        per_minibatch = [
            self._optimize(trainer, step, built.datums[a:b], RLBatch(batch.samples[a:b]), timeout_s)
            for a, b in parts
        ]
        metrics |= {
            k: sum(m[k] for m in per_minibatch) / len(per_minibatch) for k in per_minibatch[0]
        }
        metrics["train/optimizer_steps"] = float(len(per_minibatch))
        metrics["perf/step_wall_time"] = time.monotonic() - started
        self.source.trained(step)
        self._check_drift(step, metrics)
        return metrics

    def _anchored(
        self,
        trainer: FiretitanTrainingClient,
        datums: list[types.Datum],
        batch: RLBatch,
        timeout_s: float,
    ) -> RLBatch:
        """The batch with π_ref (kl_beta > 0) and π_old where the loss needs them given."""
        config = self.config
        ref = None
        if config.kl_beta > 0:
            assert self.reference is not None
            ref = self._logprobs(self.reference, datums, timeout_s)
        old: list[Any] | None = None
        if config.anchor_logp == "rollout":
            old = [sample.sampler_logprobs for sample in batch.samples]
        elif config.ppo_n_minibatches > 1 or config.loss_path == "builtin":
            old = self._logprobs(trainer, datums, timeout_s)
        return RLBatch(
            tuple(
                RLSample(
                    s.mask,
                    s.sampler_logprobs,
                    s.advantage,
                    None if old is None else old[i],
                    None if ref is None else ref[i],
                )
                for i, s in enumerate(batch.samples)
            )
        )

    @staticmethod
    def _logprobs(
        client: FiretitanTrainingClient, datums: list[types.Datum], timeout_s: float
    ) -> list[Sequence[float]]:
        output = client.forward(datums, "cross_entropy").result(timeout=timeout_s)
        return [lp.tolist() for lp in logprobs_of(output.loss_fn_outputs)]

    def _optimize(
        self,
        trainer: FiretitanTrainingClient,
        step: int,
        datums: list[types.Datum],
        batch: RLBatch,
        timeout_s: float,
    ) -> dict[str, float]:
        config = self.config
        if config.loss_path == "client":
            loss = rl_loss(
                config.policy_loss,
                config.loss_config,
                batch,
                config.loss_reduction,
                config.kl_beta,
                config.tis,
            )
            return client_loss_step(trainer, step, datums, loss, self.optimizer, timeout_s)
        name, loss_config = builtin_loss(config.policy_loss, config.loss_config, config.kl_beta)
        inputs = builtin_datums(config.policy_loss, datums, batch, config.tis)
        started = time.monotonic()
        loss_name = cast("types.LossFnType", name)
        fwd_bwd = trainer.forward_backward(inputs, loss_name, loss_config).result(timeout=timeout_s)
        fwd_bwd_s = time.monotonic() - started
        optim = trainer.optim_step(
            self.optimizer.adam_params(step),
            grad_accumulation_normalization=self.optimizer.grad_normalization,
        ).result(timeout=timeout_s)
        elapsed = time.monotonic() - started
        metrics = step_metrics(inputs, self.optimizer, step, optim, fwd_bwd_s, elapsed)
        if "loss:sum" in fwd_bwd.metrics:
            metrics["train/mean_loss"] = fwd_bwd.metrics["loss:sum"] / batch.response_tokens
        return metrics

    def _check_drift(self, step: int, metrics: dict[str, float]) -> None:
        limit, drift = self.config.inference_kl_fail, metrics.get("train/inference_kld")
        if limit is not None and drift is not None and drift > limit:
            raise InferenceDriftError(
                f"step {step}: train/inference_kld {drift:.3g} exceeds inference_kl_fail "
                f"{limit:g}: the deployment does not serve the trained weights"
            )


def _version_offsets(step: int, data: StepRollouts) -> dict[str, float]:
    """How many versions behind the trained step each rollout's weights were (0: on-policy)."""
    versions = [snapshot_version(rollout.snapshot) for row in data.rows for rollout in row.rollouts]
    offsets = [step - v for v in versions if v is not None]
    if not offsets:
        return {}
    return {
        "async/version_offset_min": float(min(offsets)),
        "async/version_offset_mean": sum(offsets) / len(offsets),
        "async/version_offset_max": float(max(offsets)),
    }


def _log_key(step: int) -> str:
    return f"rollouts:{step}"


def _minibatches(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous, near-equal [start, end) ranges over n samples."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@flow(
    name="rl",
    flow_run_name="rl-{config.run_name}",
    retries=2,  # preemption recovery; each attempt writes the config's onto its flow run
    retry_delay_seconds=30,
    persist_result=False,  # the ledger is the durable record, not Prefect results
)
def rl_flow(config: RLConfig) -> RunResult:
    """Train `config.base_model` with RL on rewards of its own samples; resumable, reporting a
    `RunResult`. A failure no retry can fix ends the flow run at once."""
    with final_unless_retry_helps():
        data = load_rl_data(config)  # a bad prompt or reward fails before any trainer exists

        def prepare(attempt: Attempt) -> RecipePlan:
            session = attempt.session
            rendered = render_rl_data(data, session.renderer, config)
            fanout = FanOut(config.task_runner)  # reward and eval scoring; stops with the session
            session.on_close(fanout.close)
            scorer = RowScorer(data.train, data.reward, session.renderer, fanout)
            source = rollout_source(attempt, data, rendered, scorer)
            reference = None
            if config.kl_beta > 0:
                with trainer_call(attempt.run.job_id, "creating the reference model"):
                    reference = session.service.create_base_training_client(config.base_model)
            log = StepInputsLog(config.resolved_run_dir)
            writer = None
            if config.write_trajectories:
                tokenizer = session.renderer.tokenizer
                writer = TrajectoryWriter(
                    config.resolved_run_dir,
                    data,
                    lambda ids: str(tokenizer.decode(ids, skip_special_tokens=False)),
                )
            step = RLStep(config, rendered.train, log, source, reference, writer)
            return RecipePlan(step, lambda point: _evaluate(attempt, data, rendered, fanout, point))

        return run_recipe(config, dataset_fingerprint=data.fingerprint, prepare=prepare)


def _evaluate(
    attempt: Attempt, data: RLData, rendered: RenderedRL, fanout: FanOut, point: int
) -> dict[str, float]:
    """Mean reward, accuracy and pass@k of the held-out prompts, sampled from the deployment
    serving the weights after `point` steps (the same seeds at every point)."""
    if data.eval is None or not rendered.eval or attempt.session.sampler is None:
        return {}
    config = attempt.run.config
    assert isinstance(config, RLConfig)
    attempt.serve(point)
    group = config.eval_completions_per_prompt
    requests = [
        eval_request(rendered.eval, row, config.seed, group) for row in range(len(rendered.eval))
    ]
    sampled = sample_rollouts(
        attempt.session.sampler,
        requests,
        point,
        rendered.max_completion_tokens,
        config.eval_temperature,
        config.sample_timeout_s,
    )
    scorer = RowScorer(data.eval, data.reward, attempt.session.renderer, fanout)
    scored = scorer.score_all(sampled, config, step=point, purpose="eval")
    steps = StepRollouts(step=point, rows=scored, cursor_after=0, epoch=0)
    ks = sorted({1, group})
    metrics = rollout_metrics(steps.metric_groups(), sample_fails=steps.sample_fails, pass_k=ks)
    renamed = {
        "rollout/raw_reward": "eval/reward",
        "rollout/accuracy": "eval/accuracy",
        "rollout/response_len/mean": "eval/response_len",
        "rollout/truncated_ratio": "eval/truncated_ratio",
        "rollout/sample_fails": "eval/sample_fails",
        **{f"rollout/pass@{k}": f"eval/pass@{k}" for k in ks},
    }
    return {new: metrics[old] for old, new in renamed.items() if old in metrics}


def configured_rl_flow(config: RLConfig) -> Flow[[RLConfig], RunResult]:
    """`rl_flow` with the config's flow retries and retry delay from its first moment
    (the flow writes them onto its run itself once training starts, for deployments)."""
    return rl_flow.with_options(
        retries=config.flow_retries, retry_delay_seconds=config.retry_delay_s
    )


def run_rl(config: RLConfig, on_progress: ProgressCallback | None = None) -> RunResult:
    """Run the RL flow in this process; `on_progress` is called after every optimizer step."""
    with progress_listener(on_progress):
        return configured_rl_flow(config)(config)
