"""Every task states its policies, and failures are classified by type, never by message.

No task may use Prefect's implicit caching (a stale "ready", a live
client in a cache key), every task has a deadline and a readable run name, and only tasks
that repeat idempotent calls retry, through the one `retry_transient` condition.
"""

from __future__ import annotations

import asyncio
import importlib
import pickle
import pkgutil
from typing import Any

import pytest
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

import tasks
from sdk import (
    APIConnectionError,
    BadRequestError,
    NotFoundError,
    ServerError,
    TrainerJobError,
    WaitTimeoutError,
)
from sdk import TrainerLostError as SdkTrainerLostError
from tasks.errors import TrainerLostError, is_lost_trainer_symptom, trainer_call, trainer_failure
from tasks.policy import retry_transient
from tasks.provision import SUBMITTED_WAITS

# Tasks that send ordered trainer operations: a repeat could apply a step twice.
NEVER_RETRIED = {
    "train-segment",
    "evaluate",
    "save-and-hotload",
    "reference-logprobs",
}


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


def test_retry_transient_classifies_inside_an_async_task() -> None:
    """Prefect calls the condition from an async task's event loop too; there `result()`
    would return a coroutine unless told to run synchronously (then nothing was retried)."""

    async def condition(exc: BaseException) -> bool:
        return retry_transient(None, None, _failed(exc))

    assert asyncio.run(condition(APIConnectionError("reset"))) is True
    assert asyncio.run(condition(ValueError("bad input"))) is False


def _sdk_lost() -> SdkTrainerLostError:
    """What the SDK's training client raises for a lost trainer: it knows no job or step."""
    return SdkTrainerLostError(None, "optim_step", None, "NotFoundError: gone")


def _wrapped_lost() -> RuntimeError:
    """A lost trainer that a caller wrapped into another error on its way up."""
    try:
        raise _sdk_lost()
    except SdkTrainerLostError as cause:
        try:
            raise RuntimeError("the step failed") from cause
        except RuntimeError as exc:
            return exc


def test_the_task_error_is_the_sdk_error() -> None:
    assert TrainerLostError is SdkTrainerLostError  # one type, whichever layer noticed


@pytest.mark.parametrize(
    "exc",
    [
        _sdk_lost(),
        TrainerJobError("failed", job_id="job", state="JOB_STATE_FAILED"),
        TimeoutError(),
        _wrapped_lost(),
    ],
    ids=["sdk-lost", "job-failed", "deadline", "wrapped-lost"],
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
        BadRequestError("lora_rank 4 != 0", status_code=400),
        NotFoundError("no such checkpoint", status_code=404),
        WaitTimeoutError(waited_for="a hotload", last_state=None, waited_s=1.0),
        ValueError("a bug"),
    ],
    ids=["bad-request", "404-control-plane", "sdk-wait-deadline", "value-error"],
)
def test_other_failures_keep_their_type(exc: BaseException) -> None:
    assert trainer_failure(exc, job_id="job", operation="x") is exc


def test_trainer_call_raises_the_typed_error_from_the_symptom() -> None:
    symptom = _sdk_lost()
    with pytest.raises(TrainerLostError) as raised, trainer_call("job", "save_state step-5", 4):
        raise symptom
    assert raised.value.__cause__ is symptom
    assert (raised.value.job_id, raised.value.step) == ("job", 4)
    assert raised.value.cause == symptom.cause  # the SDK's diagnosis survives the re-raise
    named = raised.value
    with pytest.raises(TrainerLostError) as again, trainer_call("job", "an outer call", 9):
        raise named
    assert again.value is named  # already names its job: raised as it is
    with pytest.raises(KeyError), trainer_call("job", "anything"):
        raise KeyError("not a trainer failure")
