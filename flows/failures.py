"""Which failures a flow retry can fix, and how a flow run makes the others final at once.

A flow retry reconnects to the trainer and resumes from the ledger: it is the cure for a lost
trainer or a transient fault, and only wastes minutes on an error that will recur (bad data, bad
config, a ledger of another run, an API key the platform refuses). The flow uses
`final_unless_retry_helps` to make a permanent failure final on its first attempt; the CLI uses
`is_user_error` to print such an error as one message instead of a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
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
from tasks.errors import (
    DeploymentMismatchError,
    PlatformUnreachableError,
    TrainerLostError,
    TrainerMismatchError,
)

__all__ = [
    "PERMANENT_ERRORS",
    "PlatformUnreachableError",
    "RunDirInUseError",
    "final_unless_retry_helps",
    "flow_retry_helps",
    "is_user_error",
]

logger = logging.getLogger(__name__)


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
# answer. 4xx answers other than 408/429 (which are `.retryable`) are the platform's final word,
# a trainer's refusal of a request (the SDK's `BadRequestError`) included.
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


def _end_retries() -> None:
    """Make this attempt of the current flow run its last one.

    Prefect's flow retries apply to every failure (a flow has no retry condition), and its
    server turns a Failed into AwaitingRetry while `run_count <= empirical_policy.retries`;
    lowering `retries` to the runs already made lets the failure stand.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            stored = client.read_flow_run(context.flow_run.id)
            policy = stored.empirical_policy.model_copy(update={"retries": stored.run_count - 1})
            client.update_flow_run(context.flow_run.id, empirical_policy=policy)
        context.flow_run.empirical_policy = policy
    except Exception:  # the run's own error matters more; at worst it is retried in vain
        logger.warning("could not end the retries of flow run %s", context.flow_run.id)


@contextmanager
def final_unless_retry_helps() -> Iterator[None]:
    """Around a flow body: a failure no retry can fix ends the flow run on this attempt."""
    try:
        yield
    except Exception as exc:
        if not flow_retry_helps(exc):
            _end_retries()
        raise
