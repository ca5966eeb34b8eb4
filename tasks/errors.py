"""The failures tasks raise on top of the SDK's tree, and the mapping of trainer-call failures.

The SDK's training clients already raise a lost trainer as `sdk.errors.TrainerLostError` (they
map tinker's failures by type and status code where those enter the SDK). Two more shapes
reach a task: a `TrainerJobError` from the control plane and a deadline on a trainer result.
`trainer_failure` folds all of them into one `TrainerLostError` that names the job, the
operation and the step, so that the flow-retry path is uniform:
the step's outcome is unknown, it is never repeated in place, and the flow retry reconnects
and resumes from the ledger. Every class here pickles (Prefect
serializes failures) and says `retryable=False`: retrying in place is exactly what must not
happen.

`TrainerLostError` here is the SDK's class re-exported, not a subclass of it: one type for "the
trainer went away" whichever layer noticed, so no `except` has to name two; the SDK leaves
`job_id` and `step` empty (its clients know a URL, not a job) and `trainer_call` fills them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Final

from sdk.errors import FireworksError, TrainerJobError, TrainerLostError, exception_chain

__all__ = [
    "DeploymentMismatchError",
    "PlatformUnreachableError",
    "TrainerLostError",
    "TrainerMismatchError",
    "is_lost_trainer_symptom",
    "trainer_call",
    "trainer_failure",
]

_MAX_CAUSE_CHARS: Final = 300


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


def _is_lost(exc: BaseException) -> bool:
    if isinstance(exc, TrainerLostError | TrainerJobError):
        return True
    # A trainer result past its deadline: an unknown outcome.
    return isinstance(exc, TimeoutError) and not isinstance(exc, FireworksError)


def is_lost_trainer_symptom(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the trainer is gone."""
    return any(_is_lost(link) for link in exception_chain(exc))


def trainer_failure(
    exc: BaseException, *, job_id: str, operation: str, step: int | None = None
) -> BaseException:
    """The exception to raise for a failed trainer call: a `TrainerLostError` naming the job
    for every lost-trainer symptom, else `exc` itself (a bad request stays what it is)."""
    if isinstance(exc, TrainerLostError) and exc.job_id is not None:
        return exc
    if not is_lost_trainer_symptom(exc):
        return exc
    # The SDK's error knows its cause but not the job or step: keep its cause, add ours.
    cause = exc.cause if isinstance(exc, TrainerLostError) else f"{type(exc).__name__}: {exc}"
    return TrainerLostError(job_id, operation, step, cause[:_MAX_CAUSE_CHARS])


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
