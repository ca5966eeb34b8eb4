"""The shared wait loop's pause schedules: fixed, and backed off from 50 ms to the interval."""

from __future__ import annotations

import itertools

import pytest

from sdk._polling import Done, Pending, backoff_intervals, poll_until
from sdk.errors import WaitTimeoutError
from tests.sdk.fakes import FakeClock


def test_backoff_doubles_from_fifty_milliseconds_up_to_the_cap() -> None:
    pauses = list(itertools.islice(backoff_intervals(1.0), 8))
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_a_cap_below_the_first_pause_is_the_only_pause() -> None:
    assert list(itertools.islice(backoff_intervals(0.01), 3)) == [0.01, 0.01, 0.01]


def test_poll_until_backs_off_and_the_deadline_cuts_the_last_pause() -> None:
    clock = FakeClock()
    checks = 0

    def never_done() -> Done[None] | Pending:
        nonlocal checks
        checks += 1
        return Pending("loading")

    with pytest.raises(WaitTimeoutError, match="loading"):
        poll_until(
            never_done,
            waited_for="a load",
            timeout_s=1.0,
            poll_interval_s=0.5,
            sleep=clock.sleep,
            clock=clock,
            backoff=True,
        )
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.25])
    assert checks == len(clock.sleeps) + 1  # a last look at the deadline


def test_poll_until_without_backoff_pauses_the_whole_interval() -> None:
    clock = FakeClock()
    answers = iter([Pending("a"), Pending("b"), Done("ok")])
    value = poll_until(
        lambda: next(answers),
        waited_for="it",
        timeout_s=10,
        poll_interval_s=2,
        sleep=clock.sleep,
        clock=clock,
    )
    assert value == "ok"
    assert clock.sleeps == [2, 2]
