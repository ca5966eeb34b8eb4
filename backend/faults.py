"""Fault injection: preempt trainer jobs and fail requests on purpose, so tests can prove recovery.

Recovery code is only trusted once it has run against real failures. Three kinds, all driven by
tests through `LocalPlatform`:

- `preempt(job_id)`: a RUNNING job fails now ("preempted"), its trainer state is dropped;
- `schedule_preemption([k, …])`: the trainer reports each optimizer step count through
  `record_optim_step`; reaching a listed count preempts the job, once per listed value (so a
  resumed run that replays past the same count is not preempted again);
- `inject_faults(rate, seed)`: that fraction of requests fails, deterministically for a seed:
  half answer 503 before the handler runs, half run the handler and then lose the response
  (the case that makes non-idempotent retries dangerous: a retried create would make two).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.errors import ApiError, error_response

logger = logging.getLogger(__name__)

PREEMPTED_MESSAGE = "preempted"
FaultKind = Literal["unavailable", "dropped"]


class FaultStats(BaseModel):
    """Counters of what fault injection has done so far."""

    model_config = ConfigDict(frozen=True)

    requests_drawn: int = 0
    unavailable: int = 0
    dropped: int = 0
    preemptions: int = 0

    @property
    def injected(self) -> int:
        """Requests that were made to fail (503 or dropped)."""
        return self.unavailable + self.dropped


class FaultInjector:
    """The fault state of one platform; thread-safe (requests arrive on many threads)."""

    def __init__(self, fail_running_job: Callable[[str, str], None]) -> None:
        self._fail_running_job = fail_running_job
        self._lock = threading.Lock()
        self._rate = 0.0
        self._rng: random.Random | None = None
        self._preempt_at: set[int] = set()
        self._stats = FaultStats()

    @property
    def stats(self) -> FaultStats:
        with self._lock:
            return self._stats

    def preempt(self, job_id: str) -> None:
        """RUNNING → FAILED "preempted" now; ValueError when the job is not RUNNING."""
        self._fail_running_job(job_id, PREEMPTED_MESSAGE)
        with self._lock:
            self._count(preemptions=1)
        logger.info("fault injection: preempted trainer job %s", job_id)

    def schedule_preemption(self, at_optim_steps: Iterable[int]) -> None:
        """Preempt the job that reaches each of these optimizer step counts (once per value)."""
        steps = set(at_optim_steps)
        if any(step < 1 for step in steps):
            raise ValueError(f"at_optim_steps must be positive step counts, got {sorted(steps)}")
        with self._lock:
            self._preempt_at |= steps

    @property
    def scheduled_preemptions(self) -> list[int]:
        with self._lock:
            return sorted(self._preempt_at)

    def record_optim_step(self, job_id: str, count: int) -> bool:
        """Called by the trainer after each optimizer step; True when the job was preempted."""
        with self._lock:
            if count not in self._preempt_at:
                return False
            self._preempt_at.discard(count)  # consumed: a replay past this count runs on
        self.preempt(job_id)
        return True

    def inject_faults(self, rate: float, seed: int) -> None:
        """Fail `rate` of the following requests, in an order fixed by `seed`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        with self._lock:
            self._rate = rate
            self._rng = random.Random(seed)

    def clear_faults(self) -> None:
        """Stop failing requests and forget scheduled preemptions (counters are kept)."""
        with self._lock:
            self._rate = 0.0
            self._rng = None
            self._preempt_at.clear()

    def draw(self) -> FaultKind | None:
        """One draw per request in arrival order; a second draw picks the kind of a fault."""
        with self._lock:
            if self._rng is None:
                return None
            self._count(requests_drawn=1)
            if self._rng.random() >= self._rate:
                return None
            kind: FaultKind = "unavailable" if self._rng.random() < 0.5 else "dropped"
            self._count(**{kind: 1})
            return kind

    def _count(self, **increments: int) -> None:
        current = self._stats.model_dump()
        for key, value in increments.items():
            current[key] += value
        self._stats = FaultStats(**current)


class FaultMiddleware:
    """ASGI middleware applying `FaultInjector.draw` to every HTTP request."""

    def __init__(self, app: ASGIApp, injector: FaultInjector) -> None:
        self.app = app
        self._injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self._injector.draw() if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
        elif kind == "unavailable":
            error = ApiError.unavailable("injected fault: service unavailable", "INJECTED_FAULT")
            await error_response(error)(scope, receive, send)
        else:
            await self._run_then_drop(scope, receive, send)

    async def _run_then_drop(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The handler runs (its effects persist); the client then receives the status line and
        # headers promising a body that never comes. Returning without finishing the response
        # makes uvicorn close the socket: the client sees a RemoteProtocolError / ReadError.
        start: Message | None = None

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message

        await self.app(scope, receive, capture)
        if start is None:
            return
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", b"1024"))
        logger.warning(
            "fault injection: dropping the response to %s %s", scope["method"], scope["path"]
        )
        await send({"type": "http.response.start", "status": start["status"], "headers": headers})
