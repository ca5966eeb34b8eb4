"""Per-model ordering of tinker operations by `seq_id`.

The 0.23 client submits the chunks of one `forward_backward` concurrently and the first chunk
*last*, so the server must wait for gaps: a lowest-first queue would run chunk 2 before chunk 1
exists. Each accepted `(model_id, seq_id)` maps to one request id, so a resubmission after a
lost answer returns the same future and runs nothing twice. Failures consume their seq id; the
next operation still runs, and so does a request refused before it could run (`reject`): once
its model and seq id are known, its slot completes with the refusal instead of staying a gap
that parks every later operation until the gap timeout. A request parked behind a missing seq
id for longer than the gap timeout fails (server error), as does everything parked after it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from dataclasses import dataclass

from backend.trainer.errors import ServerError, UserError
from backend.trainer.futures import FutureRecord, FutureStore
from backend.trainer.wire import WireResult

Operation = Callable[[], WireResult]
# Runs an operation on the job's worker, in submission order, and reports back to the record.
Dispatcher = Callable[[Operation, FutureRecord], None]

# Seq ids older than this window behind the head are forgotten (a resubmission that old is
# answered as stale). Bounds memory on long runs.
_REMEMBERED_SEQS = 4096


@dataclass
class _Parked:
    record: FutureRecord
    operation: Operation
    parked_at: float


class ModelSequencer:
    """Runs one model's ordered operations strictly in `seq_id` order, starting at 1."""

    def __init__(
        self,
        model_id: str,
        futures: FutureStore,
        dispatch: Dispatcher,
        *,
        gap_timeout_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self._futures = futures
        self._dispatch = dispatch
        self._gap_timeout_s = gap_timeout_s
        self._clock = clock
        self._next_seq = 1
        self._accepted: dict[int, str] = {}
        self._parked: dict[int, _Parked] = {}
        self._lock = threading.Lock()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def submit(self, seq_id: int, request_type: str, operation: Operation) -> str:
        """Accept an ordered operation; returns its request id (the same one on resubmission)."""
        with self._lock:
            known = self._accepted.get(seq_id)
            if known is not None:
                return known
            if seq_id < 1:
                raise UserError(f"seq_id must be >= 1, got {seq_id}")
            if seq_id < self._next_seq:
                raise UserError(
                    f"seq_id {seq_id} for model {self.model_id} is stale: operations up to "
                    f"{self._next_seq - 1} have already been accepted"
                )
            record = self._futures.new(request_type)
            self._accepted[seq_id] = record.request_id
            self._parked[seq_id] = _Parked(record, operation, self._clock())
            self._release_ready_locked()
            return record.request_id

    def reject(self, seq_id: int, request_type: str, error: UserError) -> str:
        """Consume `seq_id` with `error` as its result (a request whose body was refused).

        It takes its turn like any operation, so the operations before it still run first and
        the ones after it run as soon as it is reached. A resubmission gets the same failed
        future. UserError: `seq_id` itself is invalid or stale.
        """

        def refused() -> WireResult:
            raise error

        return self.submit(seq_id, request_type, refused)

    def expire_gaps(self) -> int:
        """Fail parked operations stuck behind a missing seq id for too long; returns count."""
        with self._lock:
            if not self._parked:
                return 0
            oldest = min(p.parked_at for p in self._parked.values())
            waited = self._clock() - oldest
            if waited < self._gap_timeout_s:
                return 0
            error = ServerError(
                f"model {self.model_id}: waited {waited:.0f} s for seq_id {self._next_seq}, "
                "which never arrived; later operations were abandoned"
            )
            stuck = sorted(self._parked)
            for seq in stuck:
                _fail(self._parked.pop(seq).record, error)
            self._next_seq = stuck[-1] + 1
            self._forget_old_locked()
            return len(stuck)

    def _release_ready_locked(self) -> None:
        while self._next_seq in self._parked:
            parked = self._parked.pop(self._next_seq)
            self._dispatch(parked.operation, parked.record)
            self._next_seq += 1
        self._forget_old_locked()

    def _forget_old_locked(self) -> None:
        horizon = self._next_seq - _REMEMBERED_SEQS
        if horizon > 0 and len(self._accepted) > _REMEMBERED_SEQS:
            for seq in [s for s in self._accepted if s < horizon]:
                del self._accepted[seq]


def _fail(record: FutureRecord, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        record.future.set_exception(error)


def run_operation(operation: Operation, record: FutureRecord) -> None:
    """Run `operation` and complete `record` with its result or its error."""
    try:
        result = operation()
    except BaseException as exc:
        _fail(record, exc)
        if not isinstance(exc, Exception):
            raise
        return
    with contextlib.suppress(InvalidStateError):  # the trainer was torn down while this ran
        record.future.set_result(result)
