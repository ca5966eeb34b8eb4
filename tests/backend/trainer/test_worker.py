"""The job worker: FIFO execution off the request threads, periodic ticks, clean stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from backend.trainer.errors import ServerError
from backend.trainer.futures import FutureRecord
from backend.trainer.worker import JobWorker


def _record() -> FutureRecord:
    return FutureRecord(request_id="req", request_type="Forward", future=Future())


def test_operations_run_in_dispatch_order_on_the_worker_thread() -> None:
    ran: list[tuple[int, str]] = []
    worker = JobWorker("test-worker", tick=lambda: None, tick_s=0.05)
    records = []

    def operation(index: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            ran.append((index, threading.current_thread().name))
            return {"i": index}

        return run

    for index in range(5):
        records.append(_record())
        worker.dispatch(operation(index), records[-1])
    assert [r.future.result(timeout=5) for r in records] == [{"i": i} for i in range(5)]
    assert ran == [(i, "test-worker") for i in range(5)]
    worker.stop(ServerError("done"))
    assert worker.join(5)


def test_stop_fails_queued_operations_and_later_dispatches() -> None:
    started, release = threading.Event(), threading.Event()
    worker = JobWorker("test-worker", tick=lambda: None, tick_s=0.05)
    running, queued, late = _record(), _record(), _record()

    def blocked() -> dict[str, Any]:
        started.set()
        release.wait(5)
        return {"finished": True}

    worker.dispatch(blocked, running)
    worker.dispatch(lambda: {"never": True}, queued)
    assert started.wait(5)
    worker.stop(ServerError("the trainer is gone"))
    worker.dispatch(lambda: {"never": True}, late)
    release.set()
    assert running.future.result(timeout=5) == {"finished": True}  # the running one finishes
    for record in (queued, late):
        with pytest.raises(ServerError, match="gone"):
            record.future.result(timeout=5)
    assert worker.join(5)


def test_ticks_run_while_idle_and_a_failing_tick_is_survived() -> None:
    ticks = threading.Semaphore(0)

    def tick() -> None:
        ticks.release()
        raise RuntimeError("housekeeping failed")

    worker = JobWorker("test-worker", tick=tick, tick_s=0.01)
    assert ticks.acquire(timeout=5) and ticks.acquire(timeout=5)
    record = _record()
    worker.dispatch(lambda: {"ok": True}, record)
    assert record.future.result(timeout=5) == {"ok": True}
    worker.stop(ServerError("done"))
