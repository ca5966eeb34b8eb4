"""API-key authentication for every route of the local platform.

The SDK sends the key as `X-Api-Key` on the control plane, adds `Authorization: Bearer` on the
gateway, hotload and inference, and tinker spells it `X-API-Key`; any of them is accepted. This is
ASGI middleware rather than a FastAPI dependency so that it runs before anything else looks at
the request: an unauthenticated caller learns nothing (not even whether its JSON parses).
The one exception is `GET /health`, which says only that the server answers (for smoke tests
and supervisors that hold no key).
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.errors import ApiError, error_response

_BEARER = b"bearer "
HEALTH_PATH = "/health"


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Every credential a request carries (ASGI header names are already lower-case)."""
    keys: list[bytes] = []
    for name, value in headers:
        if name == b"x-api-key":
            keys.append(value.strip())
        elif name == b"authorization" and value[: len(_BEARER)].lower() == _BEARER:
            keys.append(value[len(_BEARER) :].strip())
    return [key for key in keys if key]


def key_matches(presented: list[bytes], expected: SecretStr) -> bool:
    """Constant-time comparison of each presented key with the configured one."""
    wanted = expected.get_secret_value().encode()
    # Compare every candidate (no short-circuit) so timing does not reveal which header matched.
    results = [hmac.compare_digest(key, wanted) for key in presented]
    return any(results)


class ApiKeyMiddleware:
    """Answers 401 (JSON error body) unless the request carries the platform's API key."""

    def __init__(self, app: ASGIApp, api_key: SecretStr) -> None:
        self.app = app
        self._api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == HEALTH_PATH and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope["headers"])
        if presented and key_matches(presented, self._api_key):
            await self.app(scope, receive, send)
            return
        # The messages never contain the presented key: a mistyped key is still a secret.
        if presented:
            message = "invalid API key"
        else:
            message = "missing API key: send it as X-Api-Key or Authorization: Bearer <key>"
        await error_response(ApiError.unauthenticated(message))(scope, receive, send)
