"""The async rollout producer on its own, with a hand-written sampler: staleness-bounded
admission, the concurrency cap, rows never dropped for being late, the circuit breaker, close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from flows.rl_producer import RolloutProducer, RolloutProducerError, snapshot_version
from tasks.rollouts import RowRequest, SampledRow

ROWS_PER_STEP, GROUP = 2, 3


class GatedSampler:
    """Records which positions were asked for; a position completes once released (or at
    once when `auto` is set); `fail` positions raise."""

    def __init__(self, *, auto: bool = False, fail: frozenset[int] = frozenset()) -> None:
        self.auto, self.fail = auto, fail
        self.asked: list[int] = []
        self._released: set[int] = set()
        self._lock = threading.Lock()

    def release(self, *positions: int) -> None:
        with self._lock:
            self._released |= set(positions)

    async def __call__(self, request: RowRequest) -> SampledRow:
        with self._lock:
            self.asked.append(request.row)
        while not self.auto:
            with self._lock:
                if request.row in self._released:
                    break
            await asyncio.sleep(0.005)
        if request.row in self.fail:
            raise ConnectionError(f"row {request.row} unreachable")
        return SampledRow(request=request)


def _producer(sampler: GatedSampler, *, offpolicy: int, cap: int = 100) -> RolloutProducer:
    return RolloutProducer(
        sampler,
        lambda position: RowRequest(row=position, prompt=[1], seeds=[0] * GROUP),
        first_step=10,
        first_cursor=100,
        last_step=16,
        rows_per_step=ROWS_PER_STEP,
        group_size=GROUP,
        max_offpolicy_versions=offpolicy,
        max_samples_in_flight=cap,
    )


@pytest.fixture
def running() -> Iterator[list[RolloutProducer]]:
    producers: list[RolloutProducer] = []
    yield producers
    for producer in producers:
        producer.close()


def _settle(sampler: GatedSampler, count: int) -> list[int]:
    deadline = time.monotonic() + 5
    while len(sampler.asked) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # nothing more may arrive
    return sorted(sampler.asked)


def test_rows_are_admitted_up_to_o_versions_ahead(running: list[RolloutProducer]) -> None:
    sampler = GatedSampler()
    producer = _producer(sampler, offpolicy=1)
    running.append(producer)
    producer.start()
    # Version 10 published: steps 10 and 11 (positions 100-103) may sample, not step 12.
    assert _settle(sampler, 4) == [100, 101, 102, 103]
    sampler.release(100, 101)
    assert [row.request.row for row in producer.take(10, timeout_s=5)] == [100, 101]
    producer.publish(11)
    assert _settle(sampler, 6) == [100, 101, 102, 103, 104, 105]


def test_a_hold_admits_nothing_until_the_next_publication(
    running: list[RolloutProducer],
) -> None:
    sampler = GatedSampler()
    producer = _producer(sampler, offpolicy=2, cap=2 * GROUP)
    running.append(producer)
    producer.start()
    assert _settle(sampler, 2) == [100, 101]
    producer.hold()  # a step trained: its hotload is coming
    sampler.release(100)  # a slot frees, but nothing new may start before the publication
    time.sleep(0.2)
    assert sorted(sampler.asked) == [100, 101]
    producer.publish(10)
    assert _settle(sampler, 3) == [100, 101, 102]


def test_the_concurrency_cap_holds_rows_back(running: list[RolloutProducer]) -> None:
    sampler = GatedSampler()
    producer = _producer(sampler, offpolicy=2, cap=2 * GROUP)  # two rows in flight at most
    running.append(producer)
    producer.start()
    assert _settle(sampler, 2) == [100, 101]
    sampler.release(100)
    assert _settle(sampler, 3) == [100, 101, 102]


def test_a_late_row_is_waited_for_never_dropped(running: list[RolloutProducer]) -> None:
    sampler = GatedSampler()
    producer = _producer(sampler, offpolicy=2)
    running.append(producer)
    producer.start()
    sampler.release(100, 102, 103)  # step 10's second row is slow
    with pytest.raises(RolloutProducerError, match="not sampled within"):
        producer.take(10, timeout_s=0.2)
    sampler.release(101)
    assert [row.request.row for row in producer.take(10, timeout_s=5)] == [100, 101]
    assert [row.request.row for row in producer.take(11, timeout_s=5)] == [102, 103]


def test_failed_rows_come_back_as_failures_until_the_breaker_opens(
    running: list[RolloutProducer],
) -> None:
    sampler = GatedSampler(auto=True, fail=frozenset(range(101, 112)))
    producer = _producer(sampler, offpolicy=2)
    running.append(producer)
    producer.start()
    rows = producer.take(10, timeout_s=5)
    assert rows[0].failure is None and "ConnectionError" in str(rows[1].failure)
    for version in range(11, 16):
        producer.publish(version)
    with pytest.raises(RolloutProducerError, match="5 rows in a row failed"):
        for step in range(11, 16):
            producer.take(step, timeout_s=5)


def test_close_cancels_rows_in_flight(running: list[RolloutProducer]) -> None:
    sampler = GatedSampler()  # never released
    producer = _producer(sampler, offpolicy=0)
    producer.start()
    _settle(sampler, 2)
    started = time.monotonic()
    producer.close()
    assert time.monotonic() - started < 5
    assert not producer._thread.is_alive()


def test_snapshot_versions_come_from_the_step_names() -> None:
    assert snapshot_version("step-12-0af3") == 12
    assert snapshot_version("step-3") == 3
    assert snapshot_version(None) is None and snapshot_version("base-snapshot") is None
