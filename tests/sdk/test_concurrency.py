"""Concurrency controllers: the fixed window bounds requests in flight, the adaptive one follows
its AIMD rule on the prefill-queue EMA (hand-computed below), both report per-step counters, and
neither leaks a slot to cancellation or breaks across event loops."""

from __future__ import annotations

import asyncio
import math

import pytest

from sdk import (
    AdaptiveConcurrencyController,
    ConcurrencyController,
    ConfigError,
    FixedConcurrencyController,
    ServerMetrics,
)


def pq(seconds: float, prompt: float = 0.0, cached: float = 0.0) -> ServerMetrics:
    return ServerMetrics(
        prefill_queue_duration=seconds, prompt_tokens=prompt, cached_prompt_tokens=cached
    )


async def _peak_in_flight(controller: ConcurrencyController, tasks: int) -> int:
    in_flight = peak = 0

    async def one() -> None:
        nonlocal in_flight, peak
        await controller.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        controller.release()

    await asyncio.gather(*(one() for _ in range(tasks)))
    return peak


def test_both_controllers_satisfy_the_protocol() -> None:
    assert isinstance(FixedConcurrencyController(2), ConcurrencyController)
    assert isinstance(AdaptiveConcurrencyController(), ConcurrencyController)


def test_fixed_controller_bounds_requests_in_flight() -> None:
    controller = FixedConcurrencyController(3)
    assert asyncio.run(_peak_in_flight(controller, 20)) == 3
    assert controller.step_completed()["requests"] == 20


def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def scenario() -> int:
        controller = FixedConcurrencyController(1)
        await controller.acquire()
        waiter = asyncio.ensure_future(controller.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        controller.release()
        return await _peak_in_flight(controller, 5)

    assert asyncio.run(scenario()) == 1


def test_a_slot_granted_to_a_cancelled_waiter_is_handed_on() -> None:
    async def scenario() -> None:
        controller = FixedConcurrencyController(1)
        await controller.acquire()
        first = asyncio.ensure_future(controller.acquire())
        second = asyncio.ensure_future(controller.acquire())
        await asyncio.sleep(0)
        controller.release()  # grants `first`...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, timeout=1)  # the slot went on to `second`
        controller.release()

    asyncio.run(scenario())


def test_a_controller_works_across_event_loops() -> None:
    controller = FixedConcurrencyController(2)
    for _ in range(3):
        assert asyncio.run(_peak_in_flight(controller, 6)) == 2


def test_releasing_more_than_acquired_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="more often than acquired"):
        FixedConcurrencyController(1).release()


def test_adaptive_halves_above_target_and_grows_below_it() -> None:
    controller = AdaptiveConcurrencyController(initial_window=16, adjustment_interval=2)
    for _ in range(2):
        asyncio.run(controller.acquire())
        controller.release(pq(1.0))
    # ema = 1.0 > 0.5: 16 * 0.5
    assert controller.window_size == 8
    assert controller.ema_pq == 1.0
    for _ in range(2):
        asyncio.run(controller.acquire())
        controller.release(pq(0.0))
    # ema = 0.3 * 0 + 0.7 * 1.0 = 0.7 > 0.5: 8 * 0.5
    assert controller.ema_pq == pytest.approx(0.7)
    assert controller.window_size == 4
    for _ in range(4):
        asyncio.run(controller.acquire())
        controller.release(pq(0.0))
    # ema 0.49 (<= 0.5): 4 + 1 * min(0.5 / 0.49, 4) = 5.0204; then ema 0.343: + min(1.4577, 4)
    assert controller.ema_pq == pytest.approx(0.343)
    assert controller._window_f == pytest.approx(4 + 0.5 / 0.49 + 0.5 / 0.343)
    assert controller.window_size == 6


def test_adaptive_growth_is_capped_at_four_and_the_window_clamped() -> None:
    controller = AdaptiveConcurrencyController(
        initial_window=10, max_window=13, adjustment_interval=1
    )
    asyncio.run(controller.acquire())
    controller.release(pq(0.0))  # target / max(0, 0.001) = 500 → capped at 4
    assert controller.window_size == 13  # 14 clamped to max_window
    low = AdaptiveConcurrencyController(initial_window=2, min_window=2, adjustment_interval=1)
    asyncio.run(low.acquire())
    low.release(pq(5.0))
    assert low.window_size == 2  # 1 clamped to min_window


def test_a_shrunk_window_holds_back_new_requests() -> None:
    async def scenario() -> int:
        controller = AdaptiveConcurrencyController(initial_window=4, adjustment_interval=1)
        for _ in range(3):
            await controller.acquire()
        controller.release(pq(2.0))  # window 4 → 2 with 2 still in flight
        blocked = asyncio.ensure_future(controller.acquire())
        await asyncio.sleep(0.01)
        assert not blocked.done()
        controller.release()  # in flight 1 < 2: the waiter goes
        await asyncio.wait_for(blocked, timeout=1)
        return controller.window_size

    assert asyncio.run(scenario()) == 2


def test_step_completed_adjusts_and_reports_the_step() -> None:
    controller = AdaptiveConcurrencyController(initial_window=16, adjustment_interval=32)
    for seconds, prompt, cached in [(1.0, 10, 5), (2.0, 30, 5)]:
        asyncio.run(controller.acquire())
        controller.release(pq(seconds, prompt, cached))
    asyncio.run(controller.acquire())
    controller.release(None)  # a failed attempt: counted, no metrics
    report = controller.step_completed()
    assert report == {
        "window": 16.0,
        "requests": 3.0,
        "avg_pq": 1.5,
        "window_after": 8.0,  # ema 1.5 > 0.5
        "cache_hit_rate": 0.25,  # 10 cached of 40 prompt tokens
        "ema_pq": 1.5,
    }
    quiet = controller.step_completed()
    assert (quiet["requests"], quiet["window_after"]) == (0.0, 8.0)  # no evidence: unchanged


def test_fixed_step_report_and_no_ema() -> None:
    controller = FixedConcurrencyController(4)
    asyncio.run(controller.acquire())
    controller.release(pq(0.2, 8, 2))
    assert controller.step_completed() == {
        "window": 4.0,
        "requests": 1.0,
        "avg_pq": 0.2,
        "window_after": 4.0,
        "cache_hit_rate": 0.25,
    }
    assert math.isnan(AdaptiveConcurrencyController().step_completed()["ema_pq"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_window": 0},
        {"min_window": 5, "initial_window": 4},
        {"max_window": 8, "initial_window": 16},
        {"multiplicative_decrease": 1.0},
        {"ema_alpha": 0.0},
        {"adjustment_interval": 0},
        {"prefill_queue_target": 0.0},
    ],
)
def test_adaptive_settings_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        AdaptiveConcurrencyController(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1, True, 2.5])
def test_fixed_window_must_be_a_positive_integer(n: object) -> None:
    with pytest.raises(ConfigError):
        FixedConcurrencyController(n)  # type: ignore[arg-type]
