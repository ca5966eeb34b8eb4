"""One worker thread per trainer job: it runs the job's operations, one at a time, in order.

Training is slow and the engine is not thread-safe, so it runs here rather than on the event
loop: HTTP requests, heartbeats, health checks and long-polls stay responsive while a step
computes. Operations of all the job's models share one FIFO, so the order the sequencers
release them in is the order they run in. Between operations (and at least every `tick_s`)
the worker calls `tick`, which the trainer uses to expire sequence gaps.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError

from backend.trainer.futures import FutureRecord
from backend.trainer.sequencer import Operation, run_operation

logger = logging.getLogger(__name__)

_Item = tuple[Operation, FutureRecord]


class JobWorker:
    """A daemon thread executing dispatched operations in FIFO order until stopped."""

    def __init__(self, name: str, *, tick: Callable[[], object], tick_s: float = 1.0) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._tick = tick
        self._tick_s = tick_s
        self._stop_error: BaseException | None = None
        # Orders dispatch against stop: nothing can be queued after the final drain.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def dispatch(self, operation: Operation, record: FutureRecord) -> None:
        """Queue `operation`; its outcome completes `record`. After `stop`, fail it at once."""
        with self._lock:
            if self._stop_error is None:
                self._queue.put((operation, record))
                return
            error = self._stop_error
        _fail(record, error)

    def stop(self, error: BaseException) -> None:
        """Run nothing more: queued operations fail with `error`; the running one finishes."""
        with self._lock:
            if self._stop_error is None:
                self._stop_error = error
                self._queue.put(None)  # wakes the thread

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (never from the worker itself); True when it did."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        last_tick = time.monotonic()
        while self._stop_error is None:
            try:
                item = self._queue.get(timeout=self._tick_s)
            except queue.Empty:
                item = None
            if item is not None:
                if self._stop_error is None:
                    run_operation(*item)
                else:
                    _fail(item[1], self._stop_error)
            if time.monotonic() - last_tick >= self._tick_s:
                last_tick = time.monotonic()
                self._safe_tick()
        self._drain()

    def _safe_tick(self) -> None:
        try:
            self._tick()
        except Exception:  # a failing housekeeping step must not kill the job's worker
            logger.exception("trainer worker %s: tick failed", self._thread.name)

    def _drain(self) -> None:
        with self._lock:
            error = self._stop_error
            assert error is not None
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    _fail(item[1], error)


def _fail(record: FutureRecord, error: BaseException) -> None:
    # It may already have failed: the trainer's shutdown fails every pending future.
    with contextlib.suppress(InvalidStateError):
        record.future.set_exception(error)
