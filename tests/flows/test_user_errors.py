"""User errors fail once, in seconds, under the retry settings users get by default.

Prefect retries a flow run on every failure; the flow makes a failure no retry can fix final
on its first attempt. Each case below runs the real flow with the default `flow_retries` (2)
and `retry_delay_s` (30 s): a retried run would take a minute or more, a final one seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from algorithms.datasets import DatasetError
from backend import LocalPlatform
from flows.config import PlatformConfig, SFTConfig
from flows.failures import is_user_error
from flows.ledger import LedgerMismatchError
from flows.sft import configured_sft_flow
from sdk import AuthenticationError, BadRequestError
from tasks.errors import PlatformUnreachableError
from tests.flows.conftest import sft_config
from tests.flows.support import read_run, write_foreign_ledger

pytestmark = pytest.mark.usefixtures("prefect_server")

DEFAULT_RETRIES = SFTConfig.model_fields["flow_retries"].default
DEFAULT_DELAY_S = SFTConfig.model_fields["retry_delay_s"].default
# Far below one retry delay: a single attempt, no waiting.
FAST_S = 12.0
GOOD_ROW = (
    '{"messages": [{"role": "user", "content": "ab="}, {"role": "assistant", "content": "ba"}]}'
)


def _malformed(platform: LocalPlatform, run_dir: Path) -> dict[str, Any]:
    data = run_dir.parent / "malformed.jsonl"
    data.write_text(f"{GOOD_ROW}\n{{not json\n{GOOD_ROW}\n", encoding="utf-8")
    return {"dataset": str(data)}


def _missing(platform: LocalPlatform, run_dir: Path) -> dict[str, Any]:
    return {"dataset": str(run_dir.parent / "nowhere.jsonl")}


def _unknown_model(platform: LocalPlatform, run_dir: Path) -> dict[str, Any]:
    return {"base_model": "fireloop/no-such-model"}


def _foreign_ledger(platform: LocalPlatform, run_dir: Path) -> dict[str, Any]:
    write_foreign_ledger(run_dir)
    return {}


def _bad_key(platform: LocalPlatform, run_dir: Path) -> dict[str, Any]:
    wrong = PlatformConfig(base_url=platform.base_url, api_key=SecretStr("not-the-key"))
    return {"platform": wrong}


def _no_platform(platform: LocalPlatform, run_dir: Path) -> dict[str, Any]:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    nowhere = PlatformConfig(base_url="http://127.0.0.1:9", api_key=SecretStr("any"))
    return {"platform": nowhere}


@dataclass(frozen=True)
class UserError:
    """One user error: how to make it, what it raises, what its message must say."""

    name: str
    make: Callable[[LocalPlatform, Path], dict[str, Any]]
    error: type[BaseException]
    message: str


CASES = [
    UserError("malformed-line", _malformed, DatasetError, r"malformed\.jsonl:2: \(line\)"),
    UserError("missing-file", _missing, DatasetError, r"nowhere\.jsonl:0: \(file\): no such"),
    UserError("unknown-model", _unknown_model, BadRequestError, "no-such-model"),
    UserError("foreign-ledger", _foreign_ledger, LedgerMismatchError, "run_id is 'someone-else'"),
    UserError("bad-api-key", _bad_key, AuthenticationError, "HTTP 401"),
    UserError(
        "no-platform",
        _no_platform,
        PlatformUnreachableError,
        r"no platform at http://127\.0\.0\.1:9 — is `fireloop backend` running\?",
    ),
]


def test_the_cases_run_under_the_defaults() -> None:
    assert (DEFAULT_RETRIES, DEFAULT_DELAY_S) == (2, 30.0)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_user_error_fails_once_and_fast(
    platform: LocalPlatform, tmp_path: Path, case: UserError
) -> None:
    run_dir = tmp_path / case.name
    config = sft_config(platform, run_dir)
    fields = case.make(platform, run_dir)
    # The defaults users get, not the fast settings the other flow tests use.
    fields |= {"flow_retries": DEFAULT_RETRIES, "retry_delay_s": DEFAULT_DELAY_S}
    config = config.model_copy(update=fields)

    started = time.monotonic()
    state = configured_sft_flow(config)(config, return_state=True)
    elapsed = time.monotonic() - started

    assert state.is_failed(), state
    with pytest.raises(case.error, match=case.message) as caught:
        state.result()
    assert is_user_error(caught.value)
    assert elapsed < FAST_S, f"{case.name} took {elapsed:.1f}s"
    assert read_run(state).run_count == 1
