"""The serving thread of one replica: admits requests into the running batch and decodes.

Request handlers run on the event loop and must never compute, so every completion becomes a
`Submission` queued here; one thread per replica drains the queue into `BatchDecoder` between
decode steps and hands each submission's progress back through its `deliver` callback (called on
this thread; the completions layer forwards it to the event loop).

Weight swaps happen here too, and only on an empty batch: a swap waits until every request
admitted before it has finished, so no response mixes two weight versions and no KV cache
outlives the weights that computed it. New requests are refused (425) by the
replica while a load is pending, so the wait is bounded by the requests already in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from backend.serving.engine import ServingPlan
from backend.serving.generation import DecodingModel, DecodingSequence, TokenLogprob
from backend.serving.slots import new_decoder

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SequenceUpdate:
    """New tokens of one sequence (choice) since its previous update; the first update also
    carries the prompt's logprobs (when asked for), the last one the finish reason."""

    index: int
    tokens: list[TokenLogprob]
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Timings:
    """Monotonic times of one submission's life, for `perf_metrics`."""

    submitted: float
    admitted: float
    first_token: float
    finished: float
    batch_size: int  # sequences decoding together right after this one was admitted


@dataclass(frozen=True)
class Progress:
    """What a submission's owner receives: updates, and at the end timings or an error."""

    updates: list[SequenceUpdate]
    done: bool = False
    timings: Timings | None = None
    error: str | None = None


@dataclass(eq=False)
class Submission:
    """One request's sequences (one per choice) and where its progress goes."""

    sequences: list[DecodingSequence]
    deliver: Callable[[Progress], None]
    # False: only the final progress is delivered (a non-streamed response needs nothing
    # sooner, and each delivery wakes the event loop).
    incremental: bool = True
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    first_token: float = 0.0
    batch_size: int = 0
    _reported: list[int] = field(init=False)
    _started: list[bool] = field(init=False)
    _ended: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self._reported = [0] * len(self.sequences)
        self._started = [False] * len(self.sequences)
        self._ended = [False] * len(self.sequences)

    def cancel(self) -> None:
        """The client went away: its sequences leave the batch at the next step."""
        for sequence in self.sequences:
            sequence.cancelled = True

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.sequences)

    def progress(self) -> Progress:
        """Updates since the last call; final (with timings) once every sequence is done."""
        updates = []
        for index, sequence in enumerate(self.sequences):
            if self._ended[index]:
                continue
            entries = sequence.logprobs[self._reported[index] :]
            self._reported[index] += len(entries)
            finish = sequence.finish_reason
            if entries or finish is not None or not self._started[index]:
                prompt = None if self._started[index] else sequence.prompt_logprobs
                updates.append(SequenceUpdate(index, entries, finish, prompt))
                self._started[index] = True
                self._ended[index] = finish is not None
        if not self.finished:
            return Progress(updates)
        now = time.monotonic()
        timings = Timings(
            self.submitted, self.admitted, self.first_token or now, now, self.batch_size
        )
        return Progress(updates, done=True, timings=timings)


class GenerationLoop:
    """One thread decoding one model's batch; `submit`, `swap` and `stop` are thread-safe.
    `plan` picks the KV cache (dynamic by default); a swap keeps it, and a static cache's
    buffers with it."""

    def __init__(
        self, name: str, model: DecodingModel, max_batch_size: int, plan: ServingPlan | None = None
    ) -> None:
        self._decoder = new_decoder(model, plan or ServingPlan())
        self._max_batch_size = max_batch_size
        self._cond = threading.Condition()
        self._pending: deque[Submission] = deque()
        self._running: list[Submission] = []
        self._swap: tuple[DecodingModel, Future[None]] | None = None
        self._stopping: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Submissions queued or decoding."""
        with self._cond:
            return len(self._pending) + len(self._running)

    def submit(self, submission: Submission) -> None:
        """Queue `submission`; `SequenceTooLongError` (nothing queued) when one of its
        sequences cannot fit the decoder's per-sequence limit."""
        for sequence in submission.sequences:
            self._decoder.check_fits(sequence.spec)
        with self._cond:
            if self._stopping is not None:
                submission.deliver(Progress([], done=True, error=self._stopping))
                return
            self._pending.append(submission)
            self._cond.notify()

    def swap(self, model: DecodingModel) -> Future[None]:
        """Serve `model` once the batch has drained; the future resolves after the swap."""
        done: Future[None] = Future()
        with self._cond:
            if self._stopping is not None:
                done.set_exception(RuntimeError(self._stopping))
                return done
            if self._swap is not None:  # a superseded swap never happens
                self._swap[1].set_exception(RuntimeError("superseded by a newer swap"))
            self._swap = (model, done)
            self._cond.notify()
        return done

    def withdraw_swap(self, done: Future[None]) -> bool:
        """Cancel the swap of `done` unless it already happened (then False)."""
        with self._cond:
            if self._swap is not None and self._swap[1] is done:
                self._swap = None
                done.cancel()
                return True
            return False

    def stop(self, reason: str) -> None:
        """Fail everything queued or running with `reason` and end the thread."""
        with self._cond:
            if self._stopping is None:
                self._stopping = reason
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                logger.warning(
                    "%s still busy %.0f s after stop", self._thread.name, _JOIN_TIMEOUT_S
                )

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._running or self._swap or self._stopping):
                    self._cond.wait()
                if self._stopping is not None:
                    break
                admitted = self._take_admissions()
                swap = self._swap if not (self._pending or self._running or admitted) else None
                if swap is not None:
                    self._swap = None
            if swap is not None:
                self._decoder.serve(swap[0])
                swap[1].set_result(None)
                continue
            self._iterate(admitted)
        self._fail_all(self._stopping or "stopped")

    def _take_admissions(self) -> list[Submission]:
        room = self._max_batch_size - len(self._decoder.active)
        admitted: list[Submission] = []
        while self._pending:
            size = len(self._pending[0].sequences)
            # An oversized submission still runs, alone, rather than never.
            if size > room and (admitted or self._decoder.active):
                break
            admitted.append(self._pending.popleft())
            room -= size
        return admitted

    def _iterate(self, admitted: list[Submission]) -> None:
        try:
            live = [s for s in admitted if not s.finished]  # cancelled while queued
            if live:
                now = time.monotonic()
                for submission in live:
                    submission.admitted = now
                self._decoder.admit([seq for s in live for seq in s.sequences])
                now = time.monotonic()
                batch_size = len(self._decoder.active)
                for submission in live:
                    submission.first_token, submission.batch_size = now, batch_size
                self._running.extend(live)
            if self._decoder.active:
                self._decoder.step()
        except Exception as exc:
            # A failed step poisons the whole batch's caches: fail what ran, keep serving.
            logger.exception("%s: decoding failed", self._thread.name)
            self._decoder.cancel_all()
            self._running.extend(s for s in admitted if s not in self._running)
            self._fail_running(f"decoding failed: {type(exc).__name__}: {exc}")
            return
        self._deliver()

    def _deliver(self) -> None:
        still_running = []
        for submission in self._running:
            if not (submission.incremental or submission.finished):
                still_running.append(submission)
                continue
            progress = submission.progress()
            if progress.updates or progress.done:
                submission.deliver(progress)
            if not progress.done:
                still_running.append(submission)
        self._running = still_running

    def _fail_running(self, error: str) -> None:
        for submission in self._running:
            submission.cancel()
            submission.deliver(Progress([], done=True, error=error))
        self._running = []

    def _fail_all(self, error: str) -> None:
        self._decoder.cancel_all()
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            swap, self._swap = self._swap, None
        self._running.extend(pending)
        self._fail_running(error)
        if swap is not None:
            swap[1].set_exception(RuntimeError(error))
