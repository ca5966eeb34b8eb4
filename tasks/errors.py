"""The failures tasks raise on top of the SDK's tree, and the mapping of trainer-call failures.

A lost trainer shows itself in many shapes: tinker's `RequestFailedError` (server category)
for an operation in flight, a 404/410 for the trainer route or a forgotten request id (sometimes
wrapped in a `ValueError`), connection errors past tinker's retry budget, a `TrainerJobError`
from the control plane, a deadline on a trainer result. `trainer_failure` folds every one of
them into one `TrainerLostError`, by exception type and status code only, so that the
flow-retry path is uniform:
the step's outcome is unknown, it is never repeated in place, and the flow retry reconnects
and resumes from the ledger (design.md invariants). Every class here pickles (Prefect
serializes failures) and says `retryable=False`: retrying in place is exactly what must not
happen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Final

import tinker
from tinker import types

from sdk.errors import FireworksError, TrainerJobError

__all__ = [
    "DeploymentMismatchError",
    "PlatformUnreachableError",
    "TrainerLostError",
    "TrainerMismatchError",
    "is_lost_trainer_symptom",
    "trainer_call",
    "trainer_failure",
]

# 404: the trainer route (or the request id) is gone; 410: the server forgot a promise.
_GONE_STATUSES: Final = frozenset({404, 410})
# How deep to follow `__cause__`/`__context__` (tinker wraps a 404 into a ValueError).
_MAX_CHAIN: Final = 8


class TrainerLostError(RuntimeError):
    """The trainer went away (preempted, failed, unreachable) during `operation` at `step`.

    The operation's outcome is unknown; recovery is the flow retry: `reconnect_and_wait`, then
    the ledger's last resumable checkpoint. Not retryable in place.
    """

    retryable: ClassVar[bool] = False

    def __init__(self, job_id: str, operation: str, step: int | None, cause: str) -> None:
        self.job_id, self.operation, self.step, self.cause = job_id, operation, step, cause
        at = "" if step is None else f" at step {step}"
        super().__init__(
            f"trainer job {job_id} lost during {operation}{at} ({cause}); the flow retry "
            "reconnects and resumes from the last checkpoint in the ledger"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id, self.operation, self.step, self.cause))


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


class TrainerMismatchError(ValueError):
    """The trainer job refused this run's model settings (base model or `lora_rank` it was
    not created with): a config error, found before any training step."""

    retryable: ClassVar[bool] = False


class DeploymentMismatchError(ValueError):
    """The deployment serves another base model than the run trains: a config error."""

    retryable: ClassVar[bool] = False


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from, innermost last."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < _MAX_CHAIN:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_lost(exc: BaseException) -> bool:
    if isinstance(exc, TrainerLostError | TrainerJobError | tinker.APIConnectionError):
        return True
    if isinstance(exc, TimeoutError) and not isinstance(exc, FireworksError):
        return True  # a trainer result past its deadline: an unknown outcome
    if isinstance(exc, tinker.APIStatusError):
        return exc.status_code in _GONE_STATUSES
    if isinstance(exc, tinker.RequestFailedError):
        # A user-category failure is a bad request (it would fail again); any other category
        # is the server failing the operation, typically because its trainer went away.
        return exc.category != types.RequestErrorCategory.User
    return False


def is_lost_trainer_symptom(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the trainer is gone."""
    return any(_is_lost(link) for link in _chain(exc))


def trainer_failure(
    exc: BaseException, *, job_id: str, operation: str, step: int | None = None
) -> BaseException:
    """The exception to raise for a failed trainer call: a `TrainerLostError` for every
    lost-trainer symptom, else `exc` itself (a bad request stays what it is)."""
    if isinstance(exc, TrainerLostError) or not is_lost_trainer_symptom(exc):
        return exc
    cause = f"{type(exc).__name__}: {exc}"
    return TrainerLostError(job_id, operation, step, cause[:300])


@contextmanager
def trainer_call(job_id: str, operation: str, step: int | None = None) -> Iterator[None]:
    """Within the block, a failed trainer call raises what `trainer_failure` says."""
    try:
        yield
    except Exception as exc:
        mapped = trainer_failure(exc, job_id=job_id, operation=operation, step=step)
        if mapped is exc:
            raise
        raise mapped from exc
