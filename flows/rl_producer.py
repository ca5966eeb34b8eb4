"""Async RL: a rollout producer that keeps sampling while the trainer trains, bounded by staleness.

The producer runs its own event loop on a thread of the attempt and samples whole rows (G
completions each). The rows of step k are admitted once the published policy version v (the
steps whose weights the deployment serves) reaches k - O: so a step trains on rollouts at most
O versions old at admission, and sampling of the next O steps overlaps training and hotloading
of this one. No row is ever discarded for being stale (that would bias the data towards
prompts that sample fast); a long rollout just arrives with a larger realised offset, which the
step reports (`async/version_offset_*`). Admission also stops at `C` samples in flight.

Durability is the step-inputs log's: a step's rows are logged when the step takes them, before
it trains, so a replay reuses them; rows sampled ahead but not yet taken are lost with a crashed
attempt and sampled again by the next one (from its own, newer weights), so no row is trained
twice or skipped, and the data cursor, which only counts trained steps, never passes a row
that was not trained. Five failed rows in a row, or half of the last twenty, stop the producer
(a circuit breaker): the step waiting for rows fails with `RolloutProducerError`, which a flow
retry may clear.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import ClassVar, Final

from tasks.rollouts import RowRequest, SampledRow

__all__ = ["RolloutProducer", "RolloutProducerError", "snapshot_version"]

# The circuit breaker: the producer stops after this many failed rows in a row, or when at
# least half of the last rows failed (judged once enough rows have settled).
BREAKER_CONSECUTIVE_FAILURES: Final = 5
BREAKER_WINDOW: Final = 20
BREAKER_MIN_SETTLED: Final = 10
BREAKER_FAILURE_SHARE: Final = 0.5
_SNAPSHOT_STEP: Final = re.compile(r"^step-(\d+)(?:-|$)")


class RolloutProducerError(RuntimeError):
    """The producer stopped (its circuit breaker opened, or it failed) or a row did not arrive
    in time; a fresh attempt starts a fresh producer."""

    retryable: ClassVar[bool] = True


def snapshot_version(identity: str | None) -> int | None:
    """The policy version (steps done) a snapshot named `step-<N>-…` holds; None if unnamed."""
    match = _SNAPSHOT_STEP.match(identity or "")
    return int(match.group(1)) if match else None


SampleRow = Callable[[RowRequest], Awaitable[SampledRow]]


class RolloutProducer:
    """Samples the rows of steps `first_step`.. ahead of the trainer (see the module docstring).

    `request(position)` is the request of the row at stream position `position`; the rows of
    step k are positions `first_cursor + (k - first_step) * rows_per_step` onwards.
    """

    def __init__(
        self,
        sample: SampleRow,
        request: Callable[[int], RowRequest],
        *,
        first_step: int,
        first_cursor: int,
        last_step: int,
        rows_per_step: int,
        group_size: int,
        max_offpolicy_versions: int,
        max_samples_in_flight: int,
        close_sampler: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._sample, self._request, self._close_sampler = sample, request, close_sampler
        self._first_step, self._first_cursor = first_step, first_cursor
        self._rows_per_step, self._group = rows_per_step, group_size
        self._offpolicy, self._max_in_flight = max_offpolicy_versions, max_samples_in_flight
        self._end = first_cursor + (last_step - first_step) * rows_per_step
        self._cond = threading.Condition()
        self._version = first_step  # published: the deployment serves the weights after it
        self._held = False  # a hotload is coming: admit nothing until the next publication
        self._next = first_cursor  # the next position to admit
        self._in_flight = 0  # samples
        self._results: dict[int, SampledRow] = {}
        self._failed_in_a_row = 0
        self._rows_failed = 0
        self._recent: deque[bool] = deque(maxlen=BREAKER_WINDOW)  # settled rows: failed?
        self._error: str | None = None
        self._busy_since: float | None = None
        self._busy_s = 0.0  # time with samples in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rollout-producer", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._loop.call_soon_threadsafe(self._admit)

    def publish(self, version: int) -> None:
        """The deployment now serves the weights after `version` steps: admit what that allows."""
        with self._cond:
            self._version = max(self._version, version)
            self._held = False
        self._loop.call_soon_threadsafe(self._admit)

    def hold(self) -> None:
        """Admit nothing until the next `publish`: a hotload is coming. Requests started now
        would only meet the load (the server answers 425 until it is done) and delay it (the
        swap waits for the requests it already accepted)."""
        with self._cond:
            self._held = True

    def take(self, step: int, timeout_s: float) -> list[SampledRow]:
        """Step `step`'s rows in row order, once all are sampled (the wait is the trainer's
        wait for the sampler); raises `RolloutProducerError` if the producer stopped or the
        rows take longer than `timeout_s`."""
        start = self._first_cursor + (step - self._first_step) * self._rows_per_step
        positions = range(start, min(start + self._rows_per_step, self._end))
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not all(p in self._results for p in positions):
                if self._error is not None:
                    raise RolloutProducerError(f"the rollout producer stopped: {self._error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RolloutProducerError(
                        f"step {step}: its rows were not sampled within {timeout_s:g} s"
                    )
                self._cond.wait(left)
            return [self._results.pop(p) for p in positions]

    def busy_seconds(self) -> float:
        """Total time with samples in flight so far."""
        with self._cond:
            open_s = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
            return self._busy_s + open_s

    def gauges(self) -> dict[str, float]:
        """The producer's state now, for the step's `producer/*` metrics."""
        with self._cond:
            return {
                "producer/in_flight_samples": float(self._in_flight),
                "producer/published_version": float(self._version),
                "producer/rows_failed_total": float(self._rows_failed),
                "producer/rows_ready": float(len(self._results)),
            }

    def close(self) -> None:
        """Cancel what is in flight, close the sampler's connections, stop the thread."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._close_sampler is not None:
                await self._close_sampler()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    # -- on the producer's loop ------------------------------------------------------------

    def _step_of(self, position: int) -> int:
        return self._first_step + (position - self._first_cursor) // self._rows_per_step

    def _admit(self) -> None:
        """Admit whole rows while staleness, concurrency and the run's end allow."""
        with self._cond:
            while (
                self._error is None
                and not self._held
                and self._next < self._end
                and self._step_of(self._next) <= self._version + self._offpolicy
                and self._in_flight + self._group <= self._max_in_flight
            ):
                position = self._next
                self._next += 1
                if self._in_flight == 0:
                    self._busy_since = time.monotonic()
                self._in_flight += self._group
                task = self._loop.create_task(self._run(position))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _settle(self, row: SampledRow) -> None:
        """Count a settled row; open the circuit breaker when failures pile up."""
        failed = row.failure is not None
        self._recent.append(failed)
        self._failed_in_a_row = self._failed_in_a_row + 1 if failed else 0
        self._rows_failed += failed
        if self._error is not None:
            return
        share = sum(self._recent) / len(self._recent)
        if self._failed_in_a_row >= BREAKER_CONSECUTIVE_FAILURES:
            self._error = f"{self._failed_in_a_row} rows in a row failed to sample"
        elif len(self._recent) >= BREAKER_MIN_SETTLED and share >= BREAKER_FAILURE_SHARE:
            self._error = f"{sum(self._recent)} of the last {len(self._recent)} rows failed"
        if self._error is not None and failed:
            self._error += f"; last: {row.failure}"

    async def _run(self, position: int) -> None:
        request = self._request(position)
        try:
            row = await self._sample(request)
        except Exception as exc:  # anything the sampler raises drops this row, counted
            row = SampledRow(request=request, failure=f"{type(exc).__name__}: {exc}")
        with self._cond:
            self._in_flight -= self._group
            if self._in_flight == 0 and self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None
            self._results[position] = row
            self._settle(row)
            self._cond.notify_all()
        self._admit()
