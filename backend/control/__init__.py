"""The control plane of the local platform: one module per resource, one router each.

The wire conventions they share live here: camelCase JSON; request models that forbid unknown
fields (a typo is a 400 naming it, never silently ignored); RFC 3339 times; client-chosen ids
validated as DNS labels; one account per platform, checked on every path that names one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from backend.errors import ApiError
from backend.models.registry import UnknownModelError, canonical_model_name

Clock = Callable[[], float]
"""Seconds since the epoch; injectable so state machines can be tested without sleeping."""

AccountCheck = Callable[[str], None]
"""A FastAPI dependency on the `{account}` path segment (see `account_guard`)."""

_RESOURCE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class RequestModel(BaseModel):
    """A request body: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ResponseModel(BaseModel):
    """A response body: camelCase on the wire (routes dump it by alias, without nulls)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


def rfc3339(timestamp: float) -> str:
    """`2025-01-02T03:04:05.123456Z` for seconds since the epoch."""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_resource_id(value: str, parameter: str) -> str:
    """A client-chosen id must be a DNS label: it becomes part of resource names and URLs."""
    if not _RESOURCE_ID.match(value):
        raise ApiError.invalid_argument(
            f"{parameter} {value!r} is invalid: use 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def registered_base_model(value: str) -> str:
    """Pydantic validator body: the base model must be served by the local registry."""
    try:
        canonical_model_name(value)
    except UnknownModelError as exc:
        raise ValueError(str(exc)) from exc
    return value


def account_guard(account_id: str) -> AccountCheck:
    """A FastAPI dependency checking the `{account}` path segment against the platform's."""

    def check_account(account: str) -> None:
        # 403, not 404: the key is valid but not for that account, as on the real platform,
        # and a 404 would make `try_get` report "absent" and a flow create a job it cannot see.
        if account != account_id:
            raise ApiError.permission_denied(
                f"account {account!r} is not accessible with this API key; "
                f"the local platform serves only account {account_id!r}",
                reason="ACCOUNT_MISMATCH",
            )

    return check_account
