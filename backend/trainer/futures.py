"""Futures of the tinker protocol: every long operation answers with a request id at once and
its result is fetched later with `retrieve_future`.

The store keeps one `concurrent.futures.Future` per request id. `retrieve` long-polls: it holds
the HTTP request until the result is ready or `hold_s` has passed, because the 0.23 client
re-polls a `try_again` answer immediately, so answering "not ready" at once would spin. Results
stay retrievable for `ttl_s` after completion (a transport error mid-response makes the client
fetch the same id again). A future holds a typed result (`WireResult`); the routes encode it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from backend.trainer.errors import ServerError, UserError
from backend.trainer.wire import FailedResult, WireResult

JsonDict = dict[str, Any]


@dataclass
class FutureRecord:
    """One submitted operation: its id, its kind and the future its result lands in."""

    request_id: str
    request_type: str
    future: Future[WireResult] = field(default_factory=Future)
    completed_at: float | None = None


@dataclass(frozen=True)
class TryAgain:
    """The result is not ready within the hold time; the client should poll again."""

    request_id: str


def failed_result(exc: BaseException) -> FailedResult:
    """What a future that failed with `exc` answers: the message and its category."""
    if isinstance(exc, UserError):
        return FailedResult(error=str(exc), category="user")
    if isinstance(exc, ServerError):
        return FailedResult(error=str(exc), category="server")
    return FailedResult(error=f"internal error: {type(exc).__name__}: {exc}", category="server")


def error_payload(exc: BaseException) -> JsonDict:
    """The `{"error", "category"}` body a failed future answers with."""
    return failed_result(exc).wire_json()


class FutureStore:
    """Request id → future, with long-poll retrieval and expiry of old results."""

    def __init__(self, *, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._records: dict[str, FutureRecord] = {}
        # (completed_at, request id) in completion order, so a sweep looks only at what expired
        # instead of walking every result of the last hour on each submission.
        self._completed: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def new(self, request_type: str) -> FutureRecord:
        # Random ids: after a restart an old id must never alias a new operation's result.
        record = FutureRecord(request_id=f"req-{uuid.uuid4().hex[:16]}", request_type=request_type)
        record.future.add_done_callback(lambda _: self._mark_done(record))
        with self._lock:
            self._sweep_locked()
            self._records[record.request_id] = record
        return record

    def get(self, request_id: str) -> FutureRecord | None:
        with self._lock:
            return self._records.get(request_id)

    async def retrieve(self, request_id: str, *, hold_s: float) -> WireResult | TryAgain:
        """The result (a `FailedResult` on failure) of `request_id`, waiting up to `hold_s`.

        Raises KeyError for an unknown id (the gateway answers 404: lost server state).
        """
        record = self.get(request_id)
        if record is None:
            raise KeyError(request_id)
        if not record.future.done():
            waiter = asyncio.wrap_future(record.future)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=hold_s)
            except TimeoutError:
                return TryAgain(request_id)
            except Exception:  # the failure itself is reported below as the future's error
                pass
        exc = record.future.exception()
        return failed_result(exc) if exc is not None else record.future.result()

    def fail_pending(self, error: BaseException) -> int:
        """Fail every unfinished future (the trainer is going away); returns how many."""
        with self._lock:
            pending = [r for r in self._records.values() if not r.future.done()]
        failed = 0
        for record in pending:
            try:
                record.future.set_exception(error)
                failed += 1
            except InvalidStateError:  # it completed meanwhile: keep its real result
                pass
        return failed

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def _mark_done(self, record: FutureRecord) -> None:
        with self._lock:  # the clock is read under the lock: the deque stays in time order
            record.completed_at = self._clock()
            self._completed.append((record.completed_at, record.request_id))

    def _sweep_locked(self) -> None:
        cutoff = self._clock() - self._ttl_s
        while self._completed and self._completed[0][0] < cutoff:
            _, request_id = self._completed.popleft()
            self._records.pop(request_id, None)
