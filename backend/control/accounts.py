"""Accounts (`GET /v1/accounts`): the local platform serves exactly one account.

The SDK resolves its account id lazily from `GET /v1/accounts` and refuses keys that see zero
or several accounts, so this answers exactly one, whatever page size is asked for.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from backend.control import ResponseModel


class Account(ResponseModel):
    name: str
    display_name: str
    state: Literal["READY"] = "READY"


class AccountList(ResponseModel):
    accounts: list[Account]
    next_page_token: str | None = None


def accounts_router(account_id: str) -> APIRouter:
    """The account list: `GET /v1/accounts`."""
    router = APIRouter(prefix="/v1/accounts")
    account = Account(name=f"accounts/{account_id}", display_name="fireloop local platform")

    @router.get("", response_model_exclude_none=True)
    def list_accounts(
        page_size: Annotated[int, Query(alias="pageSize", ge=0)] = 0,
    ) -> AccountList:
        return AccountList(accounts=[account])

    return router
