"""Ctrl-C and SIGTERM as exceptions, so a CLI run unwinds: the flow run is marked final, the
temporary Prefect server is stopped, and the exit code says which signal ended it.

Python's default SIGTERM kills the process on the spot (no `finally`, no `atexit`: the Prefect
server was left running). While a flow runs, Prefect swaps in its own handler, marks the run
Crashed and re-sends the signal to the handler it found, which is this one. Prefect also runs
some of its own calls in the main thread and stores any exception they raise in a future that
no one reads, so an interrupt landing there is lost: a watcher thread sees every signal (the
wakeup fd) and delivers it again until the CLI has acted on it.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Final

__all__ = ["Terminated", "interrupt_exit_code", "release_timeout_watchers", "sigterm_raises"]

_SHELL_SIGNAL_BASE: Final = 128  # a shell reports death by signal N as 128 + N
_INTERRUPTS: Final = frozenset({signal.SIGINT, signal.SIGTERM})
REDELIVER_AFTER_S: Final = 3.0


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt (a BaseException, so `except Exception`
    in library code does not swallow it)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


class _Redelivery:
    """Delivers an interrupt to the main thread again while the CLI has not acted on it."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.pending: signal.Signals | None = None  # the signal waiting to be acted on
        self.acted = threading.Event()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="fireloop-interrupts", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data or self._closed.is_set():
                os.close(self._read_fd)
                return
            signals = [n for n in data if n in _INTERRUPTS]
            if signals and self.pending is None and not self.acted.is_set():
                self.pending = signal.Signals(signals[0])
                threading.Thread(target=self._redeliver, daemon=True).start()

    def _redeliver(self) -> None:
        while not self.acted.wait(self.after_s) and not self._closed.is_set():
            if self.pending is not None:
                _thread.interrupt_main(self.pending)

    def close(self) -> None:
        """Stop watching; the watcher thread closes its end when it wakes."""
        self._closed.set()
        signal.set_wakeup_fd(self._previous_fd)
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")  # wakes the watcher, which then exits
        os.close(self._write_fd)


_redelivery: _Redelivery | None = None


@contextmanager
def sigterm_raises(redeliver_after_s: float = REDELIVER_AFTER_S) -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread, and an interrupt that
    library code swallowed is delivered again every `redeliver_after_s` until
    `interrupt_exit_code` has seen it."""
    global _redelivery
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _redelivery = _Redelivery(redeliver_after_s)
    try:
        yield
    finally:
        _redelivery.close()
        _redelivery = None
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(exc: BaseException) -> int | None:
    """130 for Ctrl-C, 143 for SIGTERM (Prefect's own termination signal included); None
    for anything that is not an interrupt. A non-None answer means the CLI acts on it: the
    signal is not delivered again."""
    code = _exit_code(exc)
    if code is not None:
        release_timeout_watchers()
        if _redelivery is not None:
            _redelivery.acted.set()
    return code


def release_timeout_watchers() -> int:
    """Let Prefect's task-timeout watcher threads end now; how many were released.

    A task with `timeout_seconds` that runs off the main thread gets a watcher thread (not a
    daemon) that waits out the timeout unless the task leaves its cancel scope. A task cut
    short by an interrupt may never leave it, and the interpreter's exit then joins the watcher
    for the rest of the timeout: the CLI said it stopped and lingered for minutes. Setting the
    scope's event makes the watcher return without cancelling anything (the run is over
    anyway). Prefect's internals are read defensively: if they change, nothing is released and
    the exit is only slower, as before."""
    released = 0
    for thread in threading.enumerate():
        if not thread.name.startswith("timeout-watcher"):
            continue
        scope = getattr(getattr(thread, "_target", None), "__self__", None)
        event = getattr(scope, "_event", None)
        if isinstance(event, threading.Event) and not event.is_set():
            event.set()
            released += 1
    return released


def _exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, KeyboardInterrupt):
        return _SHELL_SIGNAL_BASE + signal.SIGINT
    if isinstance(exc, Terminated):
        return _SHELL_SIGNAL_BASE + exc.signum
    if "prefect.exceptions" not in sys.modules:  # no flow ever ran: not Prefect's signal
        return None
    from prefect.exceptions import TerminationSignal

    if isinstance(exc, TerminationSignal):
        return _SHELL_SIGNAL_BASE + int(exc.signal)
    return None
