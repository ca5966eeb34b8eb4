"""Where an RL step's rollouts come from when the step-inputs log does not have them.

`WindowSampler` (synchronous): at a window's first step, every row of the window is sampled at
once from the deployment serving the weights at that point. `AsyncSampler`
(`max_offpolicy_versions` > 0): a `RolloutProducer` samples ahead while the trainer trains.
Both report how long the trainer waited, the sampling rate and the last weight sync's timing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import Protocol

from algorithms.datasets import next_batch
from algorithms.rl_rollouts import StepRollouts
from flows.config import RLConfig
from flows.recipe_loop import Attempt
from flows.rl_data import RenderedRL, RLData, RowScorer, row_request
from flows.rl_producer import RolloutProducer
from sdk import AdaptiveConcurrencyController, ConcurrencyController
from tasks.rollouts import RowRequest, SampledRow, sample_rollouts, sample_row

__all__ = ["AsyncSampler", "RolloutSource", "SyncReport", "WindowSampler", "rollout_source"]


class RolloutSource(Protocol):
    """Where a step's rollouts come from when the log does not have them: every step it
    sampled at once, the asked-for step first (a window, or one step of the async producer),
    and the timing metrics of getting them."""

    def rollouts(self, step: int, cursor: int) -> list[StepRollouts]: ...

    def step_metrics(self, step: int) -> dict[str, float]: ...

    def trained(self, step: int) -> None:
        """Step `step` has trained; its weights are about to be hotloaded."""


class _Sampling:
    """What both sources hold: the attempt, the data, the scorer, and per-step metrics."""

    def __init__(
        self, attempt: Attempt, data: RLData, rendered: RenderedRL, scorer: RowScorer
    ) -> None:
        self.attempt, self.data, self.rendered, self.scorer = attempt, data, rendered, scorer
        config = attempt.run.config
        assert isinstance(config, RLConfig)
        self.config = config
        self._metrics: dict[int, dict[str, float]] = {}
        self._syncs = SyncReport(attempt)

    def step_metrics(self, step: int) -> dict[str, float]:
        return self._metrics.pop(step, {})

    def trained(self, step: int) -> None:
        """Nothing to do between a step and its hotload (a window samples at its start)."""


class WindowSampler(_Sampling):
    """Synchronous rollouts: at a window's first step, sample every step of the window from the
    deployment serving the weights at that point."""

    def step_metrics(self, step: int) -> dict[str, float]:
        """The trainer waits for all of a window's sampling at its first step, and sampling
        never overlaps training."""
        waited = {"perf/trainer_wait_for_sampler_time": 0.0, "perf/overlap_ratio": 0.0}
        return waited | super().step_metrics(step)

    def rollouts(self, step: int, cursor: int) -> list[StepRollouts]:
        started = time.monotonic()
        window = self._sample_window(step, cursor)  # serves the weights first if needed
        rate = _sampling_rate(window, time.monotonic() - started)
        sampler = self.attempt.session.sampler
        assert sampler is not None
        controller = _concurrency(sampler.concurrency_controller.step_completed())
        self._metrics[step] = self._syncs.new_sync() | rate | controller
        return window

    def _sample_window(self, step: int, cursor: int) -> list[StepRollouts]:
        config, window = self.config, self.config.weight_sync_interval
        steps = 1 if window == 0 else min(window - step % window, config.max_steps - step)
        self._serve(step)
        plan: list[tuple[int, int, list[int], int]] = []  # step, cursor, rows, cursor after
        for offset in range(steps):
            rows, after = next_batch(
                config.seed,
                cursor,
                config.prompt_groups_per_step,
                len(self.data.train.rows),
                shuffle=config.shuffle,
            )
            plan.append((step + offset, cursor, rows, after))
            cursor = after
        requests = [
            row_request(
                self.rendered.train, row, at + i, config.seed, config.completions_per_prompt
            )
            for _, at, rows, _ in plan
            for i, row in enumerate(rows)
        ]
        assert self.attempt.session.sampler is not None, "RL needs a deployment"
        sampled = sample_rollouts(
            self.attempt.session.sampler,
            requests,
            step,
            self.rendered.max_completion_tokens,
            config.temperature,
            config.sample_timeout_s,
        )
        if all(row.failure is not None for row in sampled):
            raise RuntimeError(f"step {step}: every row failed to sample: {sampled[0].failure}")
        scored = iter(self.scorer.score_all(sampled, config, step=step, purpose="train"))
        n_rows = len(self.data.train.rows)
        return [
            StepRollouts(
                step=k,
                rows=[next(scored) for _ in rows],
                cursor_after=after,
                epoch=at // n_rows,
            )
            for k, at, rows, after in plan
        ]

    def _serve(self, step: int) -> None:
        """The deployment serves the weights after `step` steps (with `weight_sync_interval`
        0, whatever it serves once the attempt's first sync is done)."""
        syncer = self.attempt.session.syncer
        if self.config.weight_sync_interval == 0 and syncer is not None and syncer.last_synced:
            return
        self.attempt.serve(step)


class SyncReport:
    """The timing of the attempt's latest weight sync, reported once, by the step after it."""

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        self._reported: str | None = None

    def new_sync(self) -> dict[str, float]:
        syncer = self.attempt.session.syncer
        if syncer is None or syncer.last_synced is None:
            return {}
        if syncer.last_synced.name == self._reported:
            return {}
        self._reported = syncer.last_synced.name
        timing = syncer.last_timing
        return {
            "perf/weight_sync_time": timing["total_time_s"],
            "perf/save_time": timing["save_time_s"],
            "perf/hotload_time": timing["hotload_time_s"],
            "perf/warmup_time": timing["warmup_time_s"],
        }


def _concurrency(counters: dict[str, float]) -> dict[str, float]:
    """The sampler's concurrency controller's counters of the step, as `concurrency/*`."""
    return {f"concurrency/{name}": value for name, value in counters.items()}


def _sampling_rate(window: Sequence[StepRollouts], seconds: float) -> dict[str, float]:
    """Completion tokens and samples per second of one sampling burst."""
    rollouts = [r for step in window for row in step.rows for r in row.rollouts]
    if seconds <= 0:
        return {}
    return {
        "perf/trainer_wait_for_sampler_time": seconds,
        "perf/rollout_tokens_per_s": sum(len(r.tokens) for r in rollouts) / seconds,
        "perf/rollout_samples_per_s": len(rollouts) / seconds,
    }


def rollout_source(
    attempt: Attempt, data: RLData, rendered: RenderedRL, scorer: RowScorer
) -> RolloutSource:
    config = attempt.run.config
    assert isinstance(config, RLConfig)
    if config.max_offpolicy_versions > 0:
        return AsyncSampler(attempt, data, rendered, scorer)
    return WindowSampler(attempt, data, rendered, scorer)


class AsyncSampler(_Sampling):
    """Asynchronous rollouts: a `RolloutProducer` started at the attempt's first step samples
    up to `max_offpolicy_versions` steps ahead; each step publishes the version the deployment
    serves, then takes its rows. The producer stops with the session."""

    def __init__(
        self, attempt: Attempt, data: RLData, rendered: RenderedRL, scorer: RowScorer
    ) -> None:
        super().__init__(attempt, data, rendered, scorer)
        self.producer: RolloutProducer | None = None
        self._sampler_controller: ConcurrencyController = AdaptiveConcurrencyController()
        self._last_take: tuple[float, float] | None = None  # (time, producer busy seconds)

    def rollouts(self, step: int, cursor: int) -> list[StepRollouts]:
        config = self.config
        self.attempt.serve(step)
        producer = self.producer or self._start(step, cursor)
        producer.publish(step)
        started, busy = time.monotonic(), producer.busy_seconds()
        sampled = producer.take(step, config.sample_timeout_s)
        waited = time.monotonic() - started
        metrics = {"perf/trainer_wait_for_sampler_time": waited, **producer.gauges()}
        metrics |= self._syncs.new_sync()
        if self._last_take is not None:
            # Of the trainer's time since the last take (training, hotload), the share during
            # which the producer was sampling.
            cycle, sampling = started - self._last_take[0], busy - self._last_take[1]
            metrics["perf/overlap_ratio"] = min(1.0, sampling / cycle) if cycle > 0 else 0.0
            metrics["perf/sampler_wait_for_trainer_time"] = max(0.0, cycle - sampling)
        metrics |= _concurrency(self._sampler_controller.step_completed())
        self._last_take = (time.monotonic(), producer.busy_seconds())
        self._metrics[step] = metrics
        if all(row.failure is not None for row in sampled):
            raise RuntimeError(f"step {step}: every row failed to sample: {sampled[0].failure}")
        n_rows = len(self.data.train.rows)
        return [
            StepRollouts(
                step=step,
                rows=self.scorer.score_all(sampled, config, step=step, purpose="train"),
                cursor_after=cursor + len(sampled),
                epoch=cursor // n_rows,
            )
        ]

    def trained(self, step: int) -> None:
        """Async RL hotloads after every step: hold new rows until it is published."""
        if self.producer is not None:
            self.producer.hold()

    def _start(self, step: int, cursor: int) -> RolloutProducer:
        config, run, session = self.config, self.attempt.run, self.attempt.session
        assert session.deployments is not None and run.deployment_id is not None
        sampler = session.deployments.create_sampler(
            run.deployment_id, concurrency_controller=self._sampler_controller
        )
        group, rows = config.completions_per_prompt, config.prompt_groups_per_step
        n_rows = len(self.data.train.rows)

        def request(position: int) -> RowRequest:
            (row,), _ = next_batch(config.seed, position, 1, n_rows, shuffle=config.shuffle)
            return row_request(self.rendered.train, row, position, config.seed, group)

        def sample(request: RowRequest) -> Awaitable[SampledRow]:
            return sample_row(
                sampler,
                request,
                max_tokens=self.rendered.max_completion_tokens,
                temperature=config.temperature,
                timeout_s=config.sample_timeout_s,
                hotload_retry_interval_s=run.waits.poll_interval_s,
            )

        producer = RolloutProducer(
            sample,
            request,
            first_step=step,
            first_cursor=cursor,
            last_step=config.max_steps,
            rows_per_step=rows,
            group_size=group,
            max_offpolicy_versions=config.max_offpolicy_versions,
            max_samples_in_flight=(config.max_offpolicy_versions + 1) * rows * group,
            close_sampler=sampler.aclose,
        )
        session.on_close(producer.close)
        producer.start()
        self.producer = producer
        return producer
