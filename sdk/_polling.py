"""Deadlines for every wait in `sdk/`: no loop polls forever, and each ends in `WaitTimeoutError`.

`Deadline` is the clock arithmetic; `poll_until` is the common loop (check, sleep, repeat) for
waits whose only state is "done yet?". Waits with richer rules (the trainer readiness loop) use
`Deadline` directly. `backoff_intervals` lets a wait that usually ends in well under its poll
interval look again soon. Clock and sleep are injected so tests run instantly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from sdk.errors import ConfigError, WaitTimeoutError

__all__ = [
    "FIRST_POLL_S",
    "Clock",
    "Deadline",
    "Done",
    "Pending",
    "Sleep",
    "backoff_intervals",
    "check_interval",
    "poll_until",
]

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], None]

# The first pause of a backed-off wait: short enough that a load finishing in a fraction of a
# second is seen at once, long enough that a slow one costs a handful of status reads.
FIRST_POLL_S = 0.05
_BACKOFF_FACTOR = 2.0


def check_interval(name: str, value: float, *, allow_zero: bool = False) -> float:
    """`value` if it is a finite positive number of seconds, else ConfigError naming `name`."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return value


class Deadline:
    """A point `timeout_s` after construction, on `clock`."""

    def __init__(self, timeout_s: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.start = clock()
        self.timeout_s = timeout_s
        self.end = self.start + timeout_s

    @property
    def elapsed(self) -> float:
        """Seconds since the deadline was set."""
        return self._clock() - self.start

    @property
    def remaining(self) -> float:
        """Seconds left; never negative."""
        return max(0.0, self.end - self._clock())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self._clock() >= self.end


def backoff_intervals(cap_s: float, *, first_s: float = FIRST_POLL_S) -> Iterator[float]:
    """Pauses between polls: `first_s`, doubling each time, never above `cap_s` (the caller's
    poll interval, which the pauses reach after a few seconds and then keep). Endless."""
    interval = min(first_s, cap_s)
    while True:
        yield interval
        interval = min(interval * _BACKOFF_FACTOR, cap_s)


@dataclass(frozen=True)
class Done(Generic[T]):
    """A wait's check succeeded with `value`."""

    value: T


@dataclass(frozen=True)
class Pending:
    """A wait's check saw `state` and wants another look (the state goes into the error)."""

    state: str | None


def poll_until(
    check: Callable[[], Done[T] | Pending],
    *,
    waited_for: str,
    timeout_s: float,
    poll_interval_s: float,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
    backoff: bool = False,
) -> T:
    """Call `check` until it reports done, sleeping `poll_interval_s` (clipped to the deadline)
    between calls. The last check runs at the deadline; then `WaitTimeoutError`.

    `backoff`: the pauses start short and grow to `poll_interval_s` (`backoff_intervals`).
    `check` may raise to end the wait early with its own typed error.
    """
    check_interval("timeout_s", timeout_s, allow_zero=True)
    check_interval("poll_interval_s", poll_interval_s)
    deadline = Deadline(timeout_s, clock)
    pauses = backoff_intervals(poll_interval_s) if backoff else None
    while True:
        poll = check()
        if isinstance(poll, Done):
            return poll.value
        if deadline.expired:
            raise WaitTimeoutError(
                waited_for=waited_for, last_state=poll.state, waited_s=deadline.elapsed
            )
        pause = next(pauses) if pauses is not None else poll_interval_s
        sleep(min(pause, deadline.remaining))
