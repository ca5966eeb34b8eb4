"""Why an attempt stopped when a signal, not the run's code, ended it: the `attempt_end` row.

A SIGTERM (eviction, `kill`), a cancel from the Prefect UI or API (the worker sends SIGTERM,
then SIGKILL after its grace period) and Ctrl-C reach the flow as a BaseException, and Prefect
retries none of them. The teardown policy is then deferred, not applied: the trainer job and
deployment stay, so running the same config again resumes from the ledger, and the policy is
applied when that run completes. The row says so, with the step a rerun resumes from.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal

from flows.ledger import AttemptEndRow, AttemptOutcome, Ledger

__all__ = ["attempt_outcome", "record_attempt_end"]

logger = logging.getLogger(__name__)


def _cancel_requested() -> bool:
    """Whether the runner or worker said, before its SIGTERM, that this is a cancel."""
    try:  # Prefect's control channel: private, so its absence only loses the distinction
        from prefect._internal.control_listener import get_intent
    except ImportError:
        return False
    return get_intent() == "cancel"


def attempt_outcome(exc: BaseException) -> AttemptOutcome:
    """`cancelled` (a cancel from the UI or API), `interrupted` (Ctrl-C) or `crashed`."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, TerminationSignal) and _cancel_requested():
        return "cancelled"
    return "crashed"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TerminationSignal):
        try:
            return f"termination signal {signal.Signals(exc.signal).name}"
        except ValueError:
            return f"termination signal {exc.signal}"
    text = str(exc)
    return type(exc).__name__ + (f": {text}" if text else "")


def record_attempt_end(ledger: Ledger, exc: BaseException, redact: Callable[[str], str]) -> None:
    """Append the `attempt_end` row for `exc` (never raising: the signal must go on)."""
    context = FlowRunContext.get()
    last = ledger.last_checkpoint()
    try:
        row = AttemptEndRow(
            outcome=attempt_outcome(exc),
            reason=redact(_reason(exc))[:500],
            next_step=last.next_step if last else 0,
            flow_run_id=str(context.flow_run.id) if context and context.flow_run else None,
        )
        ledger.append(row)
    except Exception:  # a full disk must not turn a crash into another error
        logger.exception("could not record the end of this attempt in %s", ledger.path)
        return
    logger.warning(
        "attempt %s (%s); teardown deferred: run the same config again to resume from step %d",
        row.outcome,
        row.reason,
        row.next_step,
    )
