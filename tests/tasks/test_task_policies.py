"""Every task states its policies, and failures are classified by type, never by message.

failure-modes F5/F6: no task may use Prefect's implicit caching (a stale "ready", a live
client in a cache key), every task has a deadline and a readable run name, and only tasks
that repeat idempotent calls retry, through the one `retry_transient` condition.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
from typing import Any

import httpx
import pytest
import tinker
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from tinker import types

import tasks
from sdk import APIConnectionError, NotFoundError, ServerError, TrainerJobError, WaitTimeoutError
from tasks.errors import TrainerLostError, is_lost_trainer_symptom, trainer_call, trainer_failure
from tasks.policy import retry_transient
from tasks.provision import SUBMITTED_WAITS

# Tasks that send ordered trainer operations: a repeat could apply a step twice.
NEVER_RETRIED = {"train-segment", "evaluate-loss", "save-and-hotload"}


def _all_tasks() -> list[Task[Any, Any]]:
    found: list[Task[Any, Any]] = []
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        found.extend(v for v in vars(module).values() if isinstance(v, Task) and v not in found)
    return found


def test_the_tasks_are_found() -> None:
    names = {task.name for task in _all_tasks()}
    assert {"train-segment", "ensure-trainer-job", "provision-deployment", "teardown"} <= names


@pytest.mark.parametrize("task", _all_tasks(), ids=lambda task: task.name)
def test_every_task_states_its_policies(task: Task[Any, Any]) -> None:
    assert task.cache_policy is NO_CACHE, "live clients and stale readiness: never cached"
    if task.name in SUBMITTED_WAITS:  # bounded by the SDK's deadlines instead
        assert task.timeout_seconds is None
    else:
        assert task.timeout_seconds is not None and task.timeout_seconds > 0
    assert isinstance(task.task_run_name, str) and "{" in task.task_run_name
    if task.name in NEVER_RETRIED:
        assert task.retries == 0
    else:
        assert task.retries is not None and 1 <= task.retries <= 2  # retries stack with the SDK
        assert task.retry_condition_fn is retry_transient


def _failed(exc: BaseException) -> Any:
    return Failed(data=exc)


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (ServerError("503", status_code=503), True),
        (ServerError("501", status_code=501), False),
        (APIConnectionError("reset"), True),
        (httpx.ConnectError("refused"), True),
        (NotFoundError("gone", status_code=404), False),
        (TrainerLostError("job", "an optimizer step", 3, "preempted"), False),
        (WaitTimeoutError(waited_for="x", last_state=None, waited_s=1.0), False),
        (ValueError("bad input"), False),
        (RuntimeError("unknown"), False),
    ],
)
def test_retry_transient_follows_the_retryable_flag(exc: BaseException, retry: bool) -> None:
    assert retry_transient(None, None, _failed(exc)) is retry


def test_retry_transient_never_retries_a_success() -> None:
    assert retry_transient(None, None, Completed(data=1)) is False


def _status_error(cls: type[tinker.APIStatusError], status: int) -> tinker.APIStatusError:
    request = httpx.Request("POST", "http://trainer/api/v1/optim_step")
    return cls("gone", response=httpx.Response(status, request=request), body=None)


def _lost_request() -> ValueError:
    """tinker's shape for a forgotten request id: a ValueError raised from the 404."""
    try:
        raise _status_error(tinker.NotFoundError, 404)
    except tinker.NotFoundError as cause:
        try:
            raise ValueError("Error retrieving result: not found (status 404)") from cause
        except ValueError as exc:
            return exc


@pytest.mark.parametrize(
    "exc",
    [
        tinker.RequestFailedError("trainer gone", "req-1", types.RequestErrorCategory.Server),
        tinker.RequestFailedError("?", "req-2", types.RequestErrorCategory.Unknown),
        _status_error(tinker.NotFoundError, 404),
        tinker.APIConnectionError(request=httpx.Request("GET", "http://trainer")),
        TrainerJobError("failed", job_id="job", state="JOB_STATE_FAILED"),
        TimeoutError(),
        _lost_request(),
    ],
    ids=[
        "request-failed",
        "unknown-category",
        "404",
        "connection",
        "job-failed",
        "deadline",
        "wrapped-404",
    ],
)
def test_every_lost_trainer_symptom_becomes_one_typed_error(exc: BaseException) -> None:
    assert is_lost_trainer_symptom(exc)
    mapped = trainer_failure(exc, job_id="job", operation="an optimizer step", step=7)
    assert isinstance(mapped, TrainerLostError) and mapped.retryable is False
    assert "job job lost during an optimizer step at step 7" in str(mapped)
    assert not retry_transient(None, None, _failed(mapped))
    copy = pickle.loads(pickle.dumps(mapped))  # Prefect serializes failures
    assert (copy.job_id, copy.step, str(copy)) == ("job", 7, str(mapped))


@pytest.mark.parametrize(
    "exc",
    [
        tinker.RequestFailedError("lora_rank 4 != 0", "req-3", types.RequestErrorCategory.User),
        _status_error(tinker.BadRequestError, 400),
        WaitTimeoutError(waited_for="a hotload", last_state=None, waited_s=1.0),
        ValueError("a bug"),
    ],
    ids=["user-error", "400", "sdk-wait-deadline", "value-error"],
)
def test_other_failures_keep_their_type(exc: BaseException) -> None:
    assert trainer_failure(exc, job_id="job", operation="x") is exc


def test_trainer_call_raises_the_typed_error_from_the_symptom() -> None:
    symptom = tinker.RequestFailedError("gone", "req", types.RequestErrorCategory.Server)
    with pytest.raises(TrainerLostError) as raised, trainer_call("job", "save_state step-5", 4):
        raise symptom
    assert raised.value.__cause__ is symptom
    with pytest.raises(KeyError), trainer_call("job", "anything"):
        raise KeyError("not a trainer failure")
