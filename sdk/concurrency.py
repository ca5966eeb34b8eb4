"""How many completions the sampler keeps in flight.

`FixedConcurrencyController(n)` is a semaphore of n slots. `AdaptiveConcurrencyController`
(the sampler's default) sizes the window by AIMD on the server's prefill-queue time: a queue
above target means the deployment is saturated, so halve; below, grow in proportion to the
headroom. Both count requests, prefill-queue time and prompt-cache hits per training step.

The slots are a window that can shrink and grow and is shared by every event loop that drives
the sampler (an `asyncio.Semaphore` binds to one loop and cannot be resized), so waiters are
futures of their own loops, woken thread-safely.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sdk.errors import ConfigError
from sdk.sampling_types import ServerMetrics

__all__ = [
    "AdaptiveConcurrencyController",
    "ConcurrencyController",
    "FixedConcurrencyController",
]


@runtime_checkable
class ConcurrencyController(Protocol):
    """What the sampler needs: a slot per attempt, released with that attempt's metrics."""

    @property
    def window_size(self) -> int: ...

    async def acquire(self) -> None: ...

    def release(self, metrics: ServerMetrics | None = None) -> None: ...

    def step_completed(self) -> dict[str, float]: ...


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    granted: bool = False


class _Window:
    """A counting semaphore whose limit can change, usable from any event loop or thread."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self._in_flight = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self._limit = limit
            self._wake_locked()

    async def acquire(self) -> None:
        with self._lock:
            if self._in_flight < self._limit and not self._waiters:
                self._in_flight += 1
                return
            waiter = _Waiter(asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.granted:  # the slot arrived as we were cancelled: hand it on
                    self._in_flight -= 1
                    self._wake_locked()
                else:
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        with self._lock:
            if self._in_flight <= 0:
                raise RuntimeError("concurrency slot released more often than acquired")
            self._in_flight -= 1
            self._wake_locked()

    def _wake_locked(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self._in_flight += 1
            loop = waiter.future.get_loop()
            if loop.is_closed():  # its caller is gone with its loop: reclaim the slot
                self._in_flight -= 1
                continue
            loop.call_soon_threadsafe(_grant, waiter.future)


def _grant(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _StepStats:
    """Per-step counters both controllers report from `step_completed`."""

    def __init__(self) -> None:
        self.requests = 0
        self.prefill_queue_s: list[float] = []
        self.cached_tokens = 0.0
        self.prompt_tokens = 0.0

    def record(self, metrics: ServerMetrics | None) -> None:
        self.requests += 1
        if metrics is None:
            return
        if metrics.prefill_queue_duration is not None:
            self.prefill_queue_s.append(metrics.prefill_queue_duration)
        if metrics.prompt_tokens:
            self.prompt_tokens += metrics.prompt_tokens
            self.cached_tokens += metrics.cached_prompt_tokens or 0.0

    @property
    def mean_prefill_queue_s(self) -> float:
        if not self.prefill_queue_s:
            return 0.0
        return sum(self.prefill_queue_s) / len(self.prefill_queue_s)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class FixedConcurrencyController:
    """At most `n` requests in flight."""

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"max concurrency must be a positive integer, got {n!r}")
        self._n = n
        self._window = _Window(n)
        self._step = _StepStats()

    @property
    def window_size(self) -> int:
        return self._n

    async def acquire(self) -> None:
        await self._window.acquire()

    def release(self, metrics: ServerMetrics | None = None) -> None:
        self._window.release()
        self._step.record(metrics)

    def step_completed(self) -> dict[str, float]:
        """This step's counters; the window never changes."""
        step, self._step = self._step, _StepStats()
        return {
            "window": float(self._n),
            "requests": float(step.requests),
            "avg_pq": step.mean_prefill_queue_s,
            "window_after": float(self._n),
            "cache_hit_rate": step.cache_hit_rate,
        }


class AdaptiveConcurrencyController:
    """AIMD on the EMA of the mean prefill-queue duration, every `adjustment_interval` releases
    and at each `step_completed()`:

        ema ← a·mean_pq + (1 - a)·ema          (ema ← mean_pq the first time; a = ema_alpha)
        window ← window · md                    if ema > target
        window ← window + ai · min(target / max(ema, 0.001), 4)   otherwise

    clamped to [min_window, max_window]; `window_size` is its integer part.
    """

    def __init__(
        self,
        initial_window: int = 16,
        min_window: int = 1,
        max_window: int = 256,
        prefill_queue_target: float = 0.5,
        additive_increase: float = 1.0,
        multiplicative_decrease: float = 0.5,
        ema_alpha: float = 0.3,
        adjustment_interval: int = 32,
    ) -> None:
        if not 1 <= min_window <= initial_window <= max_window:
            raise ConfigError(
                "need 1 <= min_window <= initial_window <= max_window, got "
                f"{min_window}, {initial_window}, {max_window}"
            )
        if not 0 < multiplicative_decrease < 1 or not 0 < ema_alpha <= 1:
            raise ConfigError("multiplicative_decrease must be in (0, 1), ema_alpha in (0, 1]")
        if adjustment_interval < 1 or prefill_queue_target <= 0 or additive_increase < 0:
            raise ConfigError(
                "adjustment_interval must be >= 1, prefill_queue_target > 0, additive_increase >= 0"
            )
        self.min_window = min_window
        self.max_window = max_window
        self.prefill_queue_target = prefill_queue_target
        self.additive_increase = additive_increase
        self.multiplicative_decrease = multiplicative_decrease
        self.ema_alpha = ema_alpha
        self.adjustment_interval = adjustment_interval
        self.ema_pq: float | None = None
        self._window_f = float(initial_window)
        self._window = _Window(initial_window)
        self._step = _StepStats()
        self._interval_pq: list[float] = []
        self._since_adjustment = 0

    @property
    def window_size(self) -> int:
        return int(self._window_f)

    async def acquire(self) -> None:
        await self._window.acquire()

    def release(self, metrics: ServerMetrics | None = None) -> None:
        self._window.release()
        self._step.record(metrics)
        if metrics is not None and metrics.prefill_queue_duration is not None:
            self._interval_pq.append(metrics.prefill_queue_duration)
        self._since_adjustment += 1
        if self._since_adjustment >= self.adjustment_interval:
            self._adjust()

    def step_completed(self) -> dict[str, float]:
        """Adjust on what this step saw; report the window before and after, and the step's
        requests, mean prefill-queue time, prompt-cache hit rate and the EMA."""
        window = float(self.window_size)
        self._adjust()
        step, self._step = self._step, _StepStats()
        return {
            "window": window,
            "requests": float(step.requests),
            "avg_pq": step.mean_prefill_queue_s,
            "window_after": float(self.window_size),
            "cache_hit_rate": step.cache_hit_rate,
            "ema_pq": self.ema_pq if self.ema_pq is not None else math.nan,
        }

    def _adjust(self) -> None:
        self._since_adjustment = 0
        if not self._interval_pq:
            return  # nothing measured: no evidence either way
        mean = sum(self._interval_pq) / len(self._interval_pq)
        self._interval_pq = []
        alpha = self.ema_alpha
        self.ema_pq = mean if self.ema_pq is None else alpha * mean + (1 - alpha) * self.ema_pq
        target = self.prefill_queue_target
        if self.ema_pq > target:
            window = self._window_f * self.multiplicative_decrease
        else:
            window = self._window_f + self.additive_increase * min(
                target / max(self.ema_pq, 0.001), 4.0
            )
        self._window_f = min(max(window, float(self.min_window)), float(self.max_window))
        self._window.set_limit(self.window_size)
