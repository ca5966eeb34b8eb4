"""The retry loop of one logical completion, apart from the sampler's API.

Transient failures (HTTP 408/429/5xx, a truncated stream, no answer) back off exponentially
with jitter, honouring `Retry-After` as a floor; a deployment answering 404/425 is swapping
weights and is waited out at a fixed interval. Every attempt holds one concurrency slot and
sends the same `x-request-id`, so the server side can tie the attempts together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
from pydantic import ConfigDict, Field

from sdk._config import ConfigModel
from sdk._http import AsyncHttpClient, parse_retry_after
from sdk._sse import ParsedStream, parse_stream
from sdk.concurrency import ConcurrencyController
from sdk.errors import (
    APIConnectionError,
    APITimeoutError,
    DeploymentSamplerTimeoutError,
    SamplingErrorKind,
    SamplingRequestError,
)
from sdk.sampling_types import CompletionResult, ServerMetrics

__all__ = ["AsyncSleep", "LogicalRequest", "SamplerRetryPolicy"]

logger = logging.getLogger(__name__)

COMPLETIONS_PATH = "/inference/v1/completions"
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TIMEOUT_STATUSES = frozenset({408, 504})
_HOTLOADING_STATUSES = frozenset({404, 425})  # the deployment is swapping weights (a hotload)
_REQUEST_ID_HEADERS = ("x-request-id", "x-fireworks-request-id", "cf-ray")
AsyncSleep = Callable[[float], Awaitable[None]]


class SamplerRetryPolicy(ConfigModel):
    """Per logical completion: at most `max_attempts` tries for transient failures; before
    retry n (from 0) wait `min(base·2**n, max)` times a uniform factor in
    [1 - jitter, 1 + jitter), at least the server's `Retry-After` (capped)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=7, ge=1)
    base_delay_s: float = Field(default=2.0, ge=0)
    max_delay_s: float = Field(default=30.0, ge=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    retry_after_cap_s: float = Field(default=30.0, ge=0)

    def backoff_s(self, retry: int, *, retry_after_s: float | None, u: float) -> float:
        """The wait before retry `retry`; `u` in [0, 1) draws the jitter."""
        delay = min(self.base_delay_s * 2.0 ** min(retry, 32), self.max_delay_s)
        delay *= 1.0 + self.jitter * (2.0 * u - 1.0)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.retry_after_cap_s))
        return delay


class _Failure:
    """Why one attempt failed, in the terms of `SamplingRequestError`."""

    def __init__(
        self,
        kind: SamplingErrorKind,
        detail: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.kind = kind
        self.detail = detail
        self.status = status
        self.request_id = request_id
        self.retry_after_s = retry_after_s


def _request_id(response: httpx.Response) -> str | None:
    for header in _REQUEST_ID_HEADERS:
        value: str | None = response.headers.get(header)
        if value:
            return value
    return None


class LogicalRequest:
    """The attempts of one logical completion, sharing one `x-request-id`."""

    def __init__(
        self,
        http: AsyncHttpClient,
        controller: ConcurrencyController,
        policy: SamplerRetryPolicy,
        body: dict[str, Any],
        *,
        request_id: str,
        timeout_s: float,
        context: Mapping[str, str | int],
        sleep: AsyncSleep,
        rng: Callable[[], float],
    ) -> None:
        self.http = http
        self.controller = controller
        self.policy = policy
        self.body = body
        self.model = str(body["model"])
        self.request_id = request_id
        self.timeout_s = timeout_s
        self.context = context
        self.sleep = sleep
        self.rng = rng
        self.attempts = 0

    async def run(
        self, hotload_retry_interval: float, hotload_max_retries: int
    ) -> tuple[CompletionResult, ServerMetrics]:
        policy = self.policy
        transient_failures = 0
        hotload_waits = 0
        while True:
            outcome = await self._attempt()
            if not isinstance(outcome, _Failure):
                return outcome
            if outcome.status in _HOTLOADING_STATUSES:
                if hotload_waits >= hotload_max_retries:
                    raise self._exhausted(outcome)
                hotload_waits += 1
                self._log(outcome, "deployment loading weights", hotload_retry_interval)
                await self.sleep(hotload_retry_interval)
                continue
            transient_failures += 1
            if transient_failures >= policy.max_attempts:
                raise self._exhausted(outcome)
            delay = policy.backoff_s(
                transient_failures - 1,
                retry_after_s=outcome.retry_after_s,
                u=self.rng(),
            )
            self._log(outcome, "transient failure", delay)
            await self.sleep(delay)

    async def _attempt(self) -> tuple[CompletionResult, ServerMetrics] | _Failure:
        """One try, holding a concurrency slot; released (with metrics on success) always."""
        self.attempts += 1
        metrics: ServerMetrics | None = None
        await self.controller.acquire()
        try:
            started = time.monotonic()
            try:
                response = await self.http.post(
                    COMPLETIONS_PATH,
                    json=self.body,
                    headers={"x-request-id": self.request_id},
                    read_timeout_s=self.timeout_s,
                )
            except APIConnectionError as exc:
                if not exc.retryable:
                    raise
                kind: SamplingErrorKind = (
                    "timeout" if isinstance(exc, APITimeoutError) else "connection"
                )
                return _Failure(kind, str(exc))
            failure = self._status_failure(response)
            if failure is not None:
                return failure
            parsed: ParsedStream = parse_stream(response.text)
            if parsed.truncated:
                return _Failure(
                    "sse_truncation",
                    "the stream ended without [DONE], finish_reason or raw_output",
                    status=response.status_code,
                    request_id=_request_id(response),
                )
            metrics = ServerMetrics.from_response(
                parsed.result.perf_metrics,
                response.headers,
                client_latency_s=time.monotonic() - started,
                attempts=self.attempts,
            )
            return parsed.result, metrics
        finally:
            self.controller.release(metrics)

    def _status_failure(self, response: httpx.Response) -> _Failure | None:
        status = response.status_code
        if response.is_success:
            return None
        if status in _RETRY_STATUSES or status in _HOTLOADING_STATUSES:
            return _Failure(
                "http_status",
                f"HTTP {status}",
                status=status,
                request_id=_request_id(response),
                retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            )
        # Anything else will not heal by retrying: raise the typed status error now.
        raise self.http.error_for(response, f"completion for {self.model}")

    def _log(self, failure: _Failure, why: str, delay_s: float) -> None:
        logger.warning(
            "completion %s attempt %d: %s (%s); retrying in %.3fs",
            self.request_id,
            self.attempts,
            failure.detail,
            why,
            delay_s,
        )

    def _exhausted(self, failure: _Failure) -> SamplingRequestError:
        timed_out = failure.kind == "timeout" or failure.status in _TIMEOUT_STATUSES
        cls = DeploymentSamplerTimeoutError if timed_out else SamplingRequestError
        context = self.context
        where = f" ({', '.join(f'{k}={v}' for k, v in context.items())})" if context else ""
        message = (
            f"completion {self.request_id} for {self.model}{where} failed after "
            f"{self.attempts} attempts; last: {failure.kind}: {failure.detail}"
        )
        return cls(
            message,
            logical_request_id=self.request_id,
            model=self.model,
            attempts=self.attempts,
            final_status=failure.status,
            final_error_kind=failure.kind,
            request_id=failure.request_id,
            context=context,
        )
