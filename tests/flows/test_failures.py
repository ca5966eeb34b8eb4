"""`flow_retry_helps` sorts failures by type: lost trainers and transient faults are retried by
the flow, errors that would recur (data, config, ledger, 4xx, an absent platform) are final."""

from __future__ import annotations

import pickle

import pytest
from pydantic import BaseModel, ValidationError

from algorithms.datasets import DatasetError, DatasetProblem
from flows.failures import (
    PlatformUnreachableError,
    RunDirInUseError,
    flow_retry_helps,
    is_user_error,
)
from flows.ledger import FieldDifference, LedgerMismatchError
from sdk.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TrainerJobError,
    WaitTimeoutError,
)
from tasks.errors import DeploymentMismatchError, TrainerLostError, TrainerMismatchError


class _Strict(BaseModel):
    count: int


def _validation_error() -> ValidationError:
    try:
        _Strict.model_validate({"count": "many"})
    except ValidationError as exc:
        return exc
    raise AssertionError("validation passed")


class _FlaggedError(Exception):
    retryable = True


PERMANENT: list[BaseException] = [
    DatasetError([DatasetProblem("chat.jsonl", 2, "(line)", "malformed JSON")]),
    ConfigError("platform.api_key: set it"),
    _validation_error(),
    LedgerMismatchError("runs/x/ledger.jsonl", (FieldDifference("run_id", "a", "b"),)),
    TrainerMismatchError("job refused lora_rank=8"),
    DeploymentMismatchError("serves another base model"),
    BadRequestError("unknown base model", status_code=400),
    AuthenticationError("bad key", status_code=401),
    PermissionDeniedError("no", status_code=403),
    NotFoundError("gone", status_code=404),
    ConflictError("exists", status_code=409),
    ServerError("not implemented", status_code=501),
    PlatformUnreachableError("http://127.0.0.1:9", "connection refused"),
    RunDirInUseError("runs/x", "pid 12 on host since 2026-01-01T00:00:00Z"),
    KeyboardInterrupt(),
]
TRANSIENT: list[BaseException] = [
    TrainerLostError("job-1", "optim_step", 3, "connection reset"),
    TrainerJobError("job failed", job_id="job-1", state="JOB_STATE_FAILED"),
    ServerError("overloaded", status_code=503),
    RateLimitError("slow down", status_code=429),
    APIConnectionError("connection reset"),
    WaitTimeoutError(waited_for="trainer job", last_state="CREATING", waited_s=60.0),
    _FlaggedError("a transient fault of some library"),
    OSError("an unknown failure"),
]


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda exc: type(exc).__name__)
def test_a_retry_cannot_fix_a_permanent_error(exc: BaseException) -> None:
    assert not flow_retry_helps(exc)
    assert is_user_error(exc) is not isinstance(exc, KeyboardInterrupt)


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda exc: type(exc).__name__)
def test_a_retry_may_fix_a_lost_trainer_or_transient_fault(exc: BaseException) -> None:
    assert flow_retry_helps(exc)
    assert not is_user_error(exc)


def test_a_group_is_retried_only_if_every_member_would_be() -> None:
    lost = TrainerLostError("job-1", "optim_step", 3, "reset")
    refused = AuthenticationError("bad key", status_code=401)
    assert flow_retry_helps(ExceptionGroup("provision", [lost, lost]))
    assert not flow_retry_helps(ExceptionGroup("provision", [lost, refused]))
    assert is_user_error(ExceptionGroup("provision", [refused]))


@pytest.mark.parametrize(
    "exc",
    [
        PlatformUnreachableError("http://127.0.0.1:9", "connection refused"),
        RunDirInUseError("runs/x", "pid 12"),
    ],
)
def test_the_flow_errors_pickle_and_name_what_to_do(exc: Exception) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and str(copy) == str(exc)
    assert "fireloop backend" in str(exc) or "pid 12" in str(exc)
