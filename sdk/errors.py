"""The one exception tree of `sdk/`: every failure a caller can see, classified once, by type.

Callers (Prefect tasks, flows) decide what to retry from `.retryable` and the class, never from
message text. Every class keeps a builtin base so code catching `ValueError`, `RuntimeError`,
`ConnectionError` or `TimeoutError` keeps working, and every instance survives `pickle` (Prefect
serializes failures between processes).

Hierarchy:

* FireworksError
  + ConfigError                 (also ValueError)  invalid config or argument, before any request
  + APIStatusError              (also RuntimeError) a non-2xx answer
  |  + BadRequestError          400
  |  + AuthenticationError      401
  |  + PermissionDeniedError    403
  |  + NotFoundError            404
  |  + RequestTimeoutError      408  retryable
  |  + ConflictError            409
  |  + RateLimitError           429  retryable
  |  + ServerError              5xx  retryable, except 501
  + APIConnectionError          (also ConnectionError) no answer at all; retryable
  |  + APITimeoutError          the request timed out
  + WaitTimeoutError            (also TimeoutError) a wait's deadline passed
  + TrainerJobError             (also RuntimeError) a trainer job failed or was deleted
  + TrainerLostError            (also RuntimeError) the trainer went away during a call
  + DeploymentError             (also RuntimeError) a deployment failed or was deleted
  |  + HotloadError             a hotload was refused, failed or did not finish in time
  |  + StaleDeploymentError     after a hotload, a replica serves another snapshot
  + TrainingShapeError          (also RuntimeError) a training shape has no usable version
  + SamplingRequestError        (also RuntimeError) a completion failed after its retries; retryable
     + DeploymentSamplerTimeoutError  (also TimeoutError) ... and the last failure was a timeout

Failures of trainer calls (the tinker-based Firetitan clients) are mapped into this tree where
they leave tinker (`sdk/firetitan_training.py`): a refused request (user category) is a
`BadRequestError`, a trainer that stopped answering a `TrainerLostError`.

No message ever carries request headers; the HTTP layer (`sdk/_http.py`) scrubs the API key
out of server messages before they reach this module's constructors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import httpx

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigError",
    "ConflictError",
    "DeploymentError",
    "DeploymentSamplerTimeoutError",
    "FireworksError",
    "HotloadError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "SamplingErrorKind",
    "SamplingRequestError",
    "ServerError",
    "StaleDeploymentError",
    "TrainerJobError",
    "TrainerLostError",
    "TrainingShapeError",
    "WaitTimeoutError",
    "exception_chain",
    "parse_api_error",
    "status_error",
]

REDACTED = "***"
SamplingErrorKind = Literal["http_status", "sse_truncation", "connection", "timeout"]
_MAX_TEXT_CHARS = 200
_REQUEST_ID_HEADERS = ("x-request-id", "x-fireworks-request-id")


def _rebuild(cls: type[FireworksError], message: str, state: dict[str, Any]) -> FireworksError:
    """Unpickle without calling `__init__`, whose keyword-only fields pickle can't pass."""
    # A class with both a RuntimeError and an OSError branch (DeploymentSamplerTimeoutError) is
    # allocated by OSError, whose instance layout it has; `cls.__new__` finds RuntimeError's.
    allocate = OSError.__new__ if issubclass(cls, OSError) else cls.__new__
    error = allocate(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class FireworksError(Exception):
    """Base of every error the SDK raises."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        server_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.server_message = server_message
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


class ConfigError(FireworksError, ValueError):
    """An invalid configuration or argument, detected before any request is sent."""


class APIStatusError(FireworksError, RuntimeError):
    """The platform answered with a non-2xx status; `status_code` says which."""


class BadRequestError(APIStatusError):
    """400: the platform rejected the request as malformed or invalid."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing, wrong, or not training-scoped."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not touch this resource."""


class NotFoundError(APIStatusError):
    """404: the resource does not exist (or not in this account)."""


class RequestTimeoutError(APIStatusError):
    """408: the server gave up waiting for the request."""

    retryable = True


class ConflictError(APIStatusError):
    """409: the resource already exists (client-chosen ids make creates idempotent)."""


class RateLimitError(APIStatusError):
    """429: too many requests; honour `Retry-After`."""

    retryable = True


class ServerError(APIStatusError):
    """5xx: the platform failed; retryable except 501 (Not Implemented never heals)."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        server_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(
            message, status_code=status_code, server_message=server_message, request_id=request_id
        )
        # An instance attribute shadows the class flag for the one permanent 5xx.
        self.retryable = status_code != 501


class APIConnectionError(FireworksError, ConnectionError):
    """No HTTP answer: connection refused or reset, protocol error."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """The request timed out before an answer arrived."""


class WaitTimeoutError(FireworksError, TimeoutError):
    """A wait's deadline passed. Not retryable: the deadline *was* the caller's budget."""

    def __init__(self, *, waited_for: str, last_state: str | None, waited_s: float) -> None:
        message = (
            f"timed out after {waited_s:.1f}s waiting for {waited_for}; "
            f"last state: {last_state or 'unknown'}"
        )
        super().__init__(message)
        self.waited_for = waited_for
        self.last_state = last_state
        self.waited_s = waited_s


class TrainerJobError(FireworksError, RuntimeError):
    """A trainer job failed or was deleted (tombstoned) while we needed it."""

    def __init__(self, message: str, *, job_id: str, state: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class TrainerLostError(FireworksError, RuntimeError):
    """The trainer went away (preempted, failed, unreachable) during `operation`.

    The operation's outcome is unknown, so it is never repeated in place (`retryable` is
    False): reconnect (`TrainerJobManager.reconnect_and_wait`) and resume from the last
    checkpoint. `job_id` and `step` are None where the raiser does not know them (the SDK's
    clients know the trainer's URL, not its job); a caller that does re-raises with them.
    """

    def __init__(self, job_id: str | None, operation: str, step: int | None, cause: str) -> None:
        who = f"trainer job {job_id}" if job_id else "the trainer"
        at = "" if step is None else f" at step {step}"
        super().__init__(
            f"{who} lost during {operation}{at} ({cause}); its outcome is unknown: reconnect "
            "and resume from the last checkpoint"
        )
        self.job_id, self.operation, self.step, self.cause = job_id, operation, step, cause


class DeploymentError(FireworksError, RuntimeError):
    """A deployment failed or is being deleted while we needed it."""

    def __init__(self, message: str, *, deployment_id: str, state: str | None) -> None:
        super().__init__(message)
        self.deployment_id = deployment_id
        self.state = state


class HotloadError(DeploymentError):
    """A hotload was refused or failed (stage `error` for this snapshot), or did not finish in
    time. The delta chain is then unknown: reset it and load a `base` next."""

    def __init__(
        self,
        message: str,
        *,
        deployment_id: str,
        snapshot_identity: str,
        state: str | None = None,
    ) -> None:
        super().__init__(message, deployment_id=deployment_id, state=state)
        self.snapshot_identity = snapshot_identity


class StaleDeploymentError(DeploymentError):
    """After a hotload, a replica still serves another snapshot, or is not ready: sampling from
    the deployment would evaluate the wrong weights. (A wait that looks at replica 0 alone, as the
    published SDK's does, misses a lagging replica.)"""

    def __init__(
        self,
        expected_identity: str,
        served_identity: str | None,
        *,
        deployment_id: str = "",
        replica_index: int = 0,
    ) -> None:
        served = repr(served_identity) if served_identity else "no snapshot"
        message = (
            f"deployment {deployment_id or '<unknown>'} replica {replica_index} serves {served}, "
            f"expected {expected_identity!r} (ready); do not sample from it"
        )
        super().__init__(message, deployment_id=deployment_id, state=None)
        self.expected_identity = expected_identity
        self.served_identity = served_identity
        self.replica_index = replica_index


class TrainingShapeError(FireworksError, RuntimeError):
    """A training shape exists but has no validated version to resolve to."""


class SamplingRequestError(FireworksError, RuntimeError):
    """One logical completion failed after its retries. Retryable: every failure
    the sampler retries is transient, so a later attempt (a task retry) may succeed.

    `final_status` is the last HTTP status (None when no answer came), `request_id` the server's
    id of the last attempt, `context` the sampler's `request_context` (session, run, step...).
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        logical_request_id: str,
        model: str,
        attempts: int,
        final_status: int | None,
        final_error_kind: SamplingErrorKind,
        request_id: str | None = None,
        context: Mapping[str, str | int] | None = None,
    ) -> None:
        super().__init__(message, status_code=final_status, request_id=request_id)
        self.logical_request_id = logical_request_id
        self.model = model
        self.attempts = attempts
        self.final_status = final_status
        self.final_error_kind = final_error_kind
        self.context = dict(context or {})


class DeploymentSamplerTimeoutError(SamplingRequestError, TimeoutError):
    """A `SamplingRequestError` whose last failure was a timeout (HTTP 408/504 or no answer in
    time)."""


_STATUS_CLASSES: Mapping[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    429: RateLimitError,
}

# One-line hints per status (the reference SDK's HTTP_STATUS_HINTS, reworded).
_STATUS_HINTS: Mapping[int, str] = {
    400: "check the request fields against the API reference",
    401: "check FIREWORKS_API_KEY; trainer and shape calls need a training-scoped key",
    403: "the key's account may not access this resource",
    404: "check the id and that it belongs to the key's account",
    409: "the resource already exists; reuse it or pick a new id",
    429: "rate limited; retry later or lower concurrency",
    500: "platform error; retry later",
    502: "gateway error; retry later",
    503: "service unavailable; retry later",
    504: "gateway timeout; retry later",
}


def _status_class(status_code: int) -> type[APIStatusError]:
    if status_code >= 500:
        return ServerError
    return _STATUS_CLASSES.get(status_code, APIStatusError)


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


# How deep `exception_chain` follows `__cause__`/`__context__` (tinker wraps a 404 in a ValueError).
_MAX_CHAIN = 8


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during, outermost first (bounded)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < _MAX_CHAIN:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def parse_api_error(response: httpx.Response, *, redact: Iterable[str] = ()) -> str:
    """The server's error message (google.rpc `{"error": {...}}`, bare dict, or plain text).

    Secrets in `redact` are replaced by `***` *before* truncation, so no prefix of one survives.
    """
    secrets = tuple(redact)
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _redact(response.text.strip(), secrets)[:_MAX_TEXT_CHARS]
    if isinstance(body, dict) and "error" in body:
        body = body["error"]
    if isinstance(body, dict):
        message = body.get("message")
        text = message if isinstance(message, str) and message else str(body)
    else:
        text = str(body)
    return _redact(text, secrets)


def request_id_of(response: httpx.Response) -> str | None:
    """The server's request id, for support tickets."""
    for header in _REQUEST_ID_HEADERS:
        value: str | None = response.headers.get(header)
        if value:
            return value
    return None


def status_error(
    response: httpx.Response,
    what: str,
    *,
    advice: str | None = None,
    redact: Iterable[str] = (),
) -> APIStatusError:
    """The typed error for a non-2xx `response` to the operation described by `what`."""
    code = response.status_code
    server_message = parse_api_error(response, redact=redact)
    message = f"{what} failed (HTTP {code}): {server_message or '<empty body>'}"
    if hint := advice or _STATUS_HINTS.get(code):
        message += f"\nHint: {hint}"
    cls = _status_class(code)
    return cls(
        message,
        status_code=code,
        server_message=server_message,
        request_id=request_id_of(response),
    )
