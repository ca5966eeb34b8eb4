"""google.rpc-style error bodies for every failure the local platform answers.

Clients branch on the HTTP status and read `error.message`; tinker retries an empty 4xx as a proxy
glitch (16 times). So every error path here, unknown routes and crashes included, answers
JSON with a message that names the offending field or value, and never a traceback or a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_MAX_SHOWN_INPUT = 80


class GrpcCode(IntEnum):
    """The google.rpc status codes the platform answers with (`error.code`)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# For errors raised by the routing layer itself (unknown path, wrong method), which carry only
# an HTTP status.
_CODE_FOR_STATUS: dict[int, GrpcCode] = {
    400: GrpcCode.INVALID_ARGUMENT,
    401: GrpcCode.UNAUTHENTICATED,
    403: GrpcCode.PERMISSION_DENIED,
    404: GrpcCode.NOT_FOUND,
    405: GrpcCode.UNIMPLEMENTED,
    409: GrpcCode.ALREADY_EXISTS,
    429: GrpcCode.RESOURCE_EXHAUSTED,
    503: GrpcCode.UNAVAILABLE,
    504: GrpcCode.DEADLINE_EXCEEDED,
}


class ApiError(Exception):
    """An error answered to the client: HTTP status, gRPC code, message and a machine reason."""

    def __init__(
        self,
        http_status: int,
        grpc_code: GrpcCode,
        message: str,
        reason: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code
        self.message = message
        self.reason = reason
        self.headers = dict(headers or {})

    @classmethod
    def invalid_argument(cls, message: str, reason: str = "INVALID_ARGUMENT") -> ApiError:
        return cls(400, GrpcCode.INVALID_ARGUMENT, message, reason)

    @classmethod
    def failed_precondition(cls, message: str, reason: str = "FAILED_PRECONDITION") -> ApiError:
        return cls(400, GrpcCode.FAILED_PRECONDITION, message, reason)

    @classmethod
    def not_found(cls, message: str, reason: str = "NOT_FOUND") -> ApiError:
        return cls(404, GrpcCode.NOT_FOUND, message, reason)

    @classmethod
    def already_exists(cls, message: str, reason: str = "ALREADY_EXISTS") -> ApiError:
        return cls(409, GrpcCode.ALREADY_EXISTS, message, reason)

    @classmethod
    def permission_denied(cls, message: str, reason: str = "PERMISSION_DENIED") -> ApiError:
        return cls(403, GrpcCode.PERMISSION_DENIED, message, reason)

    @classmethod
    def unauthenticated(cls, message: str) -> ApiError:
        return cls(
            401,
            GrpcCode.UNAUTHENTICATED,
            message,
            "API_KEY_INVALID",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @classmethod
    def unavailable(cls, message: str, reason: str = "UNAVAILABLE") -> ApiError:
        return cls(503, GrpcCode.UNAVAILABLE, message, reason)


def error_body(grpc_code: GrpcCode, message: str, reason: str) -> dict[str, Any]:
    """The google.rpc JSON error body: code, message, status and an `ErrorInfo` reason."""
    return {
        "error": {
            "code": int(grpc_code),
            "message": message,
            "status": grpc_code.name,
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "fireworks.ai",
                    "metadata": {},
                }
            ],
        }
    }


def error_response(error: ApiError) -> JSONResponse:
    """Render an `ApiError` (usable from ASGI middleware, outside FastAPI's handlers)."""
    return JSONResponse(
        error_body(error.grpc_code, error.message, error.reason),
        status_code=error.http_status,
        headers=error.headers,
    )


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One line naming each invalid field, e.g. `trainingConfig.loraRank: Input should be ...`."""
    return "; ".join(_describe_one(error) for error in errors) or "invalid request"


def _describe_one(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    where = loc[0] if loc else ""
    field = ".".join(loc[1:]) if where in {"body", "query", "path", "header"} else ".".join(loc)
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {error.get('ctx', {}).get('error', message)}"
    if kind == "extra_forbidden":
        return f"{field}: unknown field (extra inputs are not permitted)"
    if not field:
        field = "request body" if where in {"body", ""} else where
    shown = _shown_input(error.get("input"), kind)
    if shown and shown[len(" (got ") : -1] in message:  # the message already quotes it
        shown = ""
    return f"{field}: {message}{shown}"


def _shown_input(value: Any, kind: str) -> str:
    # The offending value helps the user most, but only a short scalar: bodies can be large, and
    # a missing field has no value to show.
    if kind == "missing" or isinstance(value, dict | list) or value is None:
        return ""
    text = repr(value)
    if len(text) > _MAX_SHOWN_INPUT:
        text = text[:_MAX_SHOWN_INPUT] + "…"
    return f" (got {text})"


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(ApiError.invalid_argument(describe_validation_errors(exc.errors())))


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_FOR_STATUS.get(exc.status_code, GrpcCode.UNKNOWN)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message, reason = f"no such route: {where}", "ROUTE_NOT_FOUND"
    elif exc.status_code == 405:
        message, reason = f"method not allowed: {where}", "METHOD_NOT_ALLOWED"
    else:
        message, reason = str(exc.detail), code.name
    error = ApiError(exc.status_code, code, message, reason, headers=exc.headers)
    return error_response(error)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server log only: the client gets a stable, secret-free message.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    error = ApiError(
        500, GrpcCode.INTERNAL, "internal error in the local platform (see its log)", "INTERNAL"
    )
    return error_response(error)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of `app` answer with an `error_body` JSON body."""
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
