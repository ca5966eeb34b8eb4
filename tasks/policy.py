"""The one task-retry rule of fireloop: retry an idempotent task only on a transient failure.

Every retrying task shares `retry_transient`: the exception's own
`retryable` flag decides, never its class name or message. Unknown
exceptions are not retried, so a side effect is never repeated by accident, and the failures
that need a resume from the ledger (a lost trainer, an uncertain step) say `retryable=False`
and reach the flow, whose retry reconnects and resumes.
"""

from __future__ import annotations

from typing import Any, Final

from prefect.tasks import exponential_backoff

__all__ = [
    "LONG_TIMEOUT_S",
    "SHORT_TIMEOUT_S",
    "TASK_RETRIES",
    "TASK_RETRY_DELAYS",
    "is_transient",
    "retry_transient",
]

# Retries stack with the SDK's own HTTP retries (300 s budget), so tasks add only a few.
TASK_RETRIES: Final = 2
TASK_RETRY_DELAYS: Final = exponential_backoff(backoff_factor=2)
# Outer backstops; the SDK and the config's wait deadlines fire first.
SHORT_TIMEOUT_S: Final = 15 * 60.0
LONG_TIMEOUT_S: Final = 12 * 3600.0


def is_transient(exc: BaseException) -> bool:
    """Whether a repeat of the same idempotent call may succeed: `exc.retryable`.

    The SDK raises its own errors for every transport failure (a connection error the SDK gave
    up on says `retryable`), so no foreign exception type needs a rule of its own here.
    """
    return getattr(exc, "retryable", False) is True


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: True only when the failure is transient (`is_transient`)."""
    try:
        # `_sync=True`: in an async task's context `result()` would hand back an un-awaited
        # coroutine, so an async task would never be retried and Python would warn.
        state.result(_sync=True)
    except Exception as exc:  # the task's own exception, re-raised by `result()`
        return is_transient(exc)
    return False
