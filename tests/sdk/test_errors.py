"""The error tree: classes, builtin bases, `retryable`, status mapping, parsing, pickling, and
the API key never showing up in any error a caller can see."""

from __future__ import annotations

import logging
import pickle

import httpx
import pytest

import sdk
from sdk import errors
from sdk.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConflictError,
    DeploymentError,
    DeploymentSamplerTimeoutError,
    FireworksError,
    HotloadError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    SamplingRequestError,
    ServerError,
    StaleDeploymentError,
    TrainerJobError,
    TrainerLostError,
    TrainingShapeError,
    WaitTimeoutError,
    parse_api_error,
    status_error,
)
from sdk.settings import resolve_api_key
from tests.sdk.conftest import FAST_RETRY
from tests.sdk.fakes import API_KEY, BASE_URL, FakeClock, FakeControlPlane, rpc_error


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ConfigError, ValueError),
        (APIStatusError, RuntimeError),
        (APIConnectionError, ConnectionError),
        (APITimeoutError, ConnectionError),
        (WaitTimeoutError, TimeoutError),
        (TrainerJobError, RuntimeError),
        (TrainerLostError, RuntimeError),
        (DeploymentError, RuntimeError),
        (TrainingShapeError, RuntimeError),
        (HotloadError, RuntimeError),
        (StaleDeploymentError, RuntimeError),
        (SamplingRequestError, RuntimeError),
        (DeploymentSamplerTimeoutError, RuntimeError),
        (DeploymentSamplerTimeoutError, TimeoutError),
    ],
    ids=lambda value: value.__name__,
)
def test_every_branch_keeps_its_builtin_base(cls: type[Exception], builtin: type) -> None:
    assert issubclass(cls, FireworksError)
    assert issubclass(cls, builtin)


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (FireworksError, False),
        (ConfigError, False),
        (APIStatusError, False),
        (BadRequestError, False),
        (AuthenticationError, False),
        (PermissionDeniedError, False),
        (NotFoundError, False),
        (ConflictError, False),
        (RequestTimeoutError, True),
        (RateLimitError, True),
        (ServerError, True),
        (APIConnectionError, True),
        (APITimeoutError, True),
        (WaitTimeoutError, False),
        (TrainerJobError, False),
        (TrainerLostError, False),
        (DeploymentError, False),
        (TrainingShapeError, False),
        (HotloadError, False),
        (StaleDeploymentError, False),
        (SamplingRequestError, True),
        (DeploymentSamplerTimeoutError, True),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_retryable_is_a_class_level_flag(cls: type[FireworksError], retryable: bool) -> None:
    assert cls.retryable is retryable


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (400, BadRequestError, False),
        (401, AuthenticationError, False),
        (403, PermissionDeniedError, False),
        (404, NotFoundError, False),
        (408, RequestTimeoutError, True),
        (409, ConflictError, False),
        (418, APIStatusError, False),
        (429, RateLimitError, True),
        (500, ServerError, True),
        (501, ServerError, False),
        (502, ServerError, True),
        (503, ServerError, True),
        (504, ServerError, True),
    ],
)
def test_status_error_picks_the_class_for_the_status(
    status: int, cls: type[APIStatusError], retryable: bool
) -> None:
    response = httpx.Response(status, json={"error": {"message": "nope"}})
    error = status_error(response, "GET /v1/thing")
    assert type(error) is cls
    assert error.status_code == status
    assert error.retryable is retryable
    assert error.server_message == "nope"
    assert str(error).startswith(f"GET /v1/thing failed (HTTP {status}): nope")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (rpc_error(404, "rlorTrainerJob not found", code=5), "rlorTrainerJob not found"),
        (httpx.Response(400, json={"code": 3, "message": "bad field"}), "bad field"),
        (httpx.Response(400, json={"code": 3, "details": []}), "{'code': 3, 'details': []}"),
        (httpx.Response(400, json={"error": "plain string"}), "plain string"),
        (httpx.Response(502, text="  <html>Bad gateway</html>\n"), "<html>Bad gateway</html>"),
        (httpx.Response(502, text="x" * 500), "x" * 200),
        (httpx.Response(500, content=b""), ""),
    ],
    ids=["google-rpc", "bare", "no-message", "error-string", "html", "long-text", "empty"],
)
def test_parse_api_error_shapes(response: httpx.Response, expected: str) -> None:
    assert parse_api_error(response) == expected


def test_redaction_happens_before_truncation() -> None:
    secret = "s" * 50
    response = httpx.Response(500, text="y" * 180 + secret)
    text = parse_api_error(response, redact=[secret])
    assert text == "y" * 180 + "***"
    assert "s" * 10 not in text


@pytest.mark.parametrize("header", ["x-request-id", "x-fireworks-request-id"])
def test_status_error_carries_the_request_id(header: str) -> None:
    response = httpx.Response(503, json={"message": "busy"}, headers={header: "req-42"})
    assert status_error(response, "GET /x").request_id == "req-42"


def test_status_error_adds_a_hint_and_explicit_advice_wins() -> None:
    response = httpx.Response(401, json={"message": "unauthenticated"})
    assert "FIREWORKS_API_KEY" in str(status_error(response, "GET /x"))
    assert "Hint: do this" in str(status_error(response, "GET /x", advice="do this"))


def test_wait_timeout_message_names_what_state_and_seconds() -> None:
    error = WaitTimeoutError(
        waited_for="trainer job j1", last_state="JOB_STATE_CREATING", waited_s=12.3
    )
    assert str(error) == (
        "timed out after 12.3s waiting for trainer job j1; last state: JOB_STATE_CREATING"
    )


ALL_ERRORS = [
    FireworksError("base", status_code=None, request_id="r1"),
    ConfigError("bad field"),
    APIStatusError("teapot", status_code=418, server_message="short and stout"),
    BadRequestError("bad", status_code=400, server_message="m", request_id="r2"),
    AuthenticationError("who", status_code=401),
    PermissionDeniedError("no", status_code=403),
    NotFoundError("gone", status_code=404),
    RequestTimeoutError("slow", status_code=408),
    ConflictError("dup", status_code=409),
    RateLimitError("slow down", status_code=429),
    ServerError("boom", status_code=501, server_message="not implemented"),
    APIConnectionError("refused"),
    APITimeoutError("timed out"),
    WaitTimeoutError(waited_for="deployment d", last_state="CREATING", waited_s=600.0),
    TrainerJobError("failed: preempted", job_id="j1", state="JOB_STATE_FAILED"),
    TrainerLostError(None, "optim_step", None, "RequestFailedError: preempted"),
    DeploymentError("is FAILED", deployment_id="d1", state="FAILED"),
    TrainingShapeError("no validated version"),
    HotloadError("refused", deployment_id="d1", snapshot_identity="s-1", state="error"),
    StaleDeploymentError("s-2", "s-1", deployment_id="d1", replica_index=1),
    SamplingRequestError(
        "gave up",
        logical_request_id="abc",
        model="accounts/a/deployments/d",
        attempts=7,
        final_status=503,
        final_error_kind="http_status",
        request_id="r3",
        context={"step": 4, "run": "r"},
    ),
    DeploymentSamplerTimeoutError(
        "slow",
        logical_request_id="def",
        model="accounts/a/deployments/d",
        attempts=7,
        final_status=None,
        final_error_kind="timeout",
    ),
]


@pytest.mark.parametrize("error", ALL_ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_survives_pickle(error: FireworksError) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert clone.args == error.args
    assert clone.__dict__ == error.__dict__
    assert clone.retryable is error.retryable


def test_every_error_class_is_pickle_tested_and_exported() -> None:
    classes = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, FireworksError)
    }
    assert classes == {type(e) for e in ALL_ERRORS}
    assert {cls.__name__ for cls in classes} <= set(sdk.__all__)


# -- the API key never leaks ------------------------------------------------------------------


def _raise_via_manager(fake: FakeControlPlane, clock: FakeClock) -> FireworksError:
    manager = sdk.TrainerJobManager(
        API_KEY,
        BASE_URL,
        transport=fake.transport(),
        retry=FAST_RETRY,
        sleep=clock.sleep,
        clock=clock,
    )
    with pytest.raises(FireworksError) as caught:
        manager.get("job-1")
    return caught.value


def _echo_in_rpc_401(fake: FakeControlPlane) -> None:
    fake.queue("GET /v1/accounts", rpc_error(401, f"invalid key {API_KEY}", code=16))


def _echo_in_text_500(fake: FakeControlPlane) -> None:
    fake.queue("GET /v1/accounts", *[httpx.Response(500, text=f"oops key={API_KEY}")] * 10)


def _echo_in_bare_dict(fake: FakeControlPlane) -> None:
    fake.queue("GET /v1/accounts", httpx.Response(400, json={"code": 3, "key": API_KEY}))


def _echo_in_connect_error(fake: FakeControlPlane) -> None:
    fake.queue("GET /v1/accounts", *[httpx.ConnectError(f"refused {API_KEY}")] * 10)


def _echo_in_timeout(fake: FakeControlPlane) -> None:
    fake.queue("GET /v1/accounts", *[httpx.ReadTimeout(f"slow {API_KEY}")] * 10)


def _echo_in_job_404(fake: FakeControlPlane) -> None:
    fake.queue(
        "GET /v1/accounts/acct/rlorTrainerJobs/job-1",
        rpc_error(404, f"no job for X-Api-Key: {API_KEY}", code=5),
    )


@pytest.mark.parametrize(
    "script",
    [
        _echo_in_rpc_401,
        _echo_in_text_500,
        _echo_in_bare_dict,
        _echo_in_connect_error,
        _echo_in_timeout,
        _echo_in_job_404,
    ],
    ids=["rpc-401", "text-500-exhausted", "bare-dict-400", "connect-error", "timeout", "job-404"],
)
def test_api_key_never_appears_in_errors_or_logs(
    script: object, fake: FakeControlPlane, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert callable(script)
    script(fake)
    with caplog.at_level(logging.DEBUG):
        error = _raise_via_manager(fake, clock)
    clone = pickle.loads(pickle.dumps(error))
    for text in (str(error), repr(error), str(clone), repr(clone), caplog.text):
        assert API_KEY not in text
    assert API_KEY not in repr(error.__dict__)


def test_a_bad_key_is_described_not_echoed() -> None:
    key = "fw-secret part"
    with pytest.raises(ConfigError) as caught:
        resolve_api_key(key)
    assert "whitespace" in str(caught.value)
    assert key not in str(caught.value)
    assert "secret" not in repr(caught.value)


# -- trainer calls: tinker's failures mapped where they enter the SDK -------------------------


def _tinker_status(status: int) -> Exception:
    import tinker

    cls = {404: tinker.NotFoundError, 400: tinker.BadRequestError, 503: tinker.InternalServerError}
    request = httpx.Request("POST", "http://trainer/api/v1/optim_step")
    response = httpx.Response(status, request=request, json={"error": {"message": "m"}})
    return cls[status]("m", response=response, body=None)


def _tinker_failures() -> list[tuple[str, Exception, type[FireworksError]]]:
    import tinker
    from tinker import types

    def wrapped_404() -> ValueError:
        # tinker's shape for a forgotten request id: a ValueError raised from the 404.
        try:
            raise _tinker_status(404)
        except tinker.NotFoundError as cause:
            try:
                raise ValueError("Error retrieving result: not found (status 404)") from cause
            except ValueError as exc:
                return exc

    category = types.RequestErrorCategory
    return [
        (
            "request-failed",
            tinker.RequestFailedError("gone", "r1", category.Server),
            TrainerLostError,
        ),
        (
            "unknown-category",
            tinker.RequestFailedError("?", "r2", category.Unknown),
            TrainerLostError,
        ),
        ("404", _tinker_status(404), TrainerLostError),
        ("wrapped-404", wrapped_404(), TrainerLostError),
        (
            "connection",
            tinker.APIConnectionError(request=httpx.Request("GET", "http://trainer")),
            TrainerLostError,
        ),
        ("transport", httpx.ConnectError("refused"), TrainerLostError),
        (
            "user-category",
            tinker.RequestFailedError("rank 4", "r3", category.User),
            BadRequestError,
        ),
        ("400", _tinker_status(400), BadRequestError),
        ("503", _tinker_status(503), ServerError),
    ]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [(exc, cls) for _, exc, cls in _tinker_failures()],
    ids=[name for name, _, _ in _tinker_failures()],
)
def test_trainer_failures_become_the_sdks_errors_by_type_and_status(
    exc: Exception, expected: type[FireworksError]
) -> None:
    from sdk.firetitan_training import trainer_errors

    with pytest.raises(FireworksError) as raised, trainer_errors("optim_step"):
        raise exc
    mapped = raised.value
    assert type(mapped) is expected
    assert raised.value.__cause__ is exc
    assert "optim_step" in str(mapped)
    clone = pickle.loads(pickle.dumps(mapped))  # Prefect serializes failures between processes
    assert (type(clone), str(clone), clone.__dict__) == (expected, str(mapped), mapped.__dict__)
    if expected is TrainerLostError:
        assert mapped.retryable is False and isinstance(mapped, RuntimeError)


def test_trainer_errors_leave_other_failures_alone() -> None:
    from sdk.firetitan_training import trainer_errors

    mine = ConfigError("lora_rank must be >= 0")
    for exc in (mine, ValueError("a bug"), TimeoutError()):
        with pytest.raises(type(exc)) as raised, trainer_errors("forward"):
            raise exc
        assert raised.value is exc


def test_a_lost_trainer_names_the_job_when_known() -> None:
    lost = TrainerLostError("job-1", "an optimizer step", 7, "preempted")
    assert str(lost).startswith("trainer job job-1 lost during an optimizer step at step 7")
    anonymous = TrainerLostError(None, "optim_step", None, "preempted")
    assert str(anonymous).startswith("the trainer lost during optim_step (preempted)")
