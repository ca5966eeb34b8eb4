"""Which failures a flow retry can fix, and the two run-level errors the flows raise themselves.

A flow retry reconnects to the trainer and resumes from the ledger: it is the cure for a lost
trainer or a transient fault, and only wastes minutes on an error that will recur (bad data, bad
config, a ledger of another run, an API key the platform refuses). The flow uses
`flow_retry_helps` to make a permanent failure final on its first attempt; the CLI uses it to
print such an error as one message instead of a traceback.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError

from algorithms.chat import ChatTemplateError
from algorithms.datasets import DatasetError
from flows.ledger import LedgerError
from sdk.errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    TrainerJobError,
)
from tasks.errors import DeploymentMismatchError, TrainerLostError, TrainerMismatchError

__all__ = [
    "PERMANENT_ERRORS",
    "PlatformUnreachableError",
    "RunDirInUseError",
    "flow_retry_helps",
    "is_user_error",
]


class PlatformUnreachableError(ConnectionError):
    """Nothing answered at the platform URL on the run's first control-plane call.

    A platform that has never answered is a wrong URL or a backend that is not running, not a
    blip: the run fails at once with a hint instead of spending the HTTP retry budget.
    """

    retryable: ClassVar[bool] = False

    def __init__(self, base_url: str, cause: str) -> None:
        self.base_url, self.cause = base_url, cause
        super().__init__(
            f"no platform at {base_url} — is `fireloop backend` running? "
            f"(or fix platform.base_url) [{cause}]"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.base_url, self.cause))


class RunDirInUseError(RuntimeError):
    """Another live flow holds the run directory's lock (one run directory, one run)."""

    retryable: ClassVar[bool] = False

    def __init__(self, run_dir: str, holder: str) -> None:
        self.run_dir, self.holder = run_dir, holder
        super().__init__(
            f"run directory {run_dir} is in use by another run ({holder}); wait for it to "
            "finish, stop it, or use another run_name / run_dir"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_dir, self.holder))


# Errors that recur on every attempt: the same file, config, ledger or key meets the same
# answer. 4xx answers other than 408/429 (which are `.retryable`) are the platform's final word.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    DatasetError,
    ChatTemplateError,
    ConfigError,
    ValidationError,
    LedgerError,
    TrainerMismatchError,
    DeploymentMismatchError,
    BadRequestError,
    AuthenticationError,
    PermissionDeniedError,
    NotFoundError,
    ConflictError,
    PlatformUnreachableError,
    RunDirInUseError,
)


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is a known permanent error whose message is all a user needs to see."""
    if isinstance(exc, BaseExceptionGroup):
        return bool(exc.exceptions) and all(is_user_error(inner) for inner in exc.exceptions)
    if isinstance(exc, APIStatusError):
        return not exc.retryable
    return isinstance(exc, PERMANENT_ERRORS)


def flow_retry_helps(exc: BaseException) -> bool:
    """Whether running the flow again (reconnect, resume from the ledger) may succeed.

    True: a lost trainer (`TrainerLostError`, `TrainerJobError`), anything whose `.retryable`
    is True (5xx, 408, 429, connections and timeouts the SDK gave up on, sampling failures).
    False: the `PERMANENT_ERRORS` (bad data, bad config, ledger of another run, refused model
    settings, 4xx answers, a platform that never answered, a run directory in use), and
    interrupts (`KeyboardInterrupt`, cancellation: not `Exception`s, Prefect never retries them).

    Any other answer of the platform that is not `.retryable` (a 501, a 4xx without a class of
    its own) is its final word too.

    Anything else (a `WaitTimeoutError` on a slow platform included) is retried, on purpose: an
    unknown failure mid-run (an escaped transport error, a disk that filled and drained, a bug
    in a dependency that depends on timing) is more often transient than not, and a wrongly
    final failure loses an unattended run's recovery, while a needless retry costs
    `flow_retries * retry_delay_s` and resumes from the ledger.
    A group (parallel provisioning) is retried only if every member would be.
    """
    if isinstance(exc, BaseExceptionGroup):
        return bool(exc.exceptions) and all(flow_retry_helps(inner) for inner in exc.exceptions)
    if not isinstance(exc, Exception):
        return False
    # Lost trainers say `retryable=False` (never retry the call in place) yet are exactly what
    # the flow retry exists for, so they are decided before the flag.
    if isinstance(exc, TrainerLostError | TrainerJobError):
        return True
    if getattr(exc, "retryable", False) is True:
        return True
    return not isinstance(exc, (*PERMANENT_ERRORS, APIStatusError))
