"""The one module in `sdk/` that owns httpx: clients, auth headers, timeouts, retries, errors.

Every control-plane, hotload and warmup call goes through `HttpClient.request` (with the retry
loop) or `HttpClient.probe` (one attempt, a yes/no answer). Sampling goes through
`AsyncHttpClient.post`: one attempt per call, because the sampler owns its retry loop (one
logical completion is retried as a unit). Callers get an `httpx.Response` or a typed error from
`sdk.errors`; they never see an httpx exception.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import ConfigDict, Field

from sdk._closing import ClosesOnExit
from sdk._config import ConfigModel
from sdk.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    FireworksError,
    status_error,
)
from sdk.settings import normalize_url

__all__ = [
    "AsyncHttpClient",
    "HttpClient",
    "RetryPolicy",
    "parse_retry_after",
    "response_json",
    "tls_verify_default",
]

logger = logging.getLogger(__name__)

_TIMEOUT_BY_VERB: Mapping[str, float] = {"GET": 30.0}
_DEFAULT_TIMEOUT_S = 60.0  # POST, DELETE, PATCH, as in the published SDK
_MAX_BACKOFF_EXPONENT = 32  # 2**32 s is past any cap; stops float growth on long budgets
# The sampling client: long reads (a completion may take minutes), many connections.
_ASYNC_CONNECT_S = 30.0
_ASYNC_READ_S = 600.0
_ASYNC_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64)
# Transport failures worth another attempt: no answer yet, or the answer was cut off.
RETRYABLE_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


class RetryPolicy(ConfigModel):
    """How `HttpClient.request` retries transient failures, within one wall-clock budget.

    Delay before retry n+1 (n from 0): `min(base_delay_s * 2**n, max_delay_s)`, scaled by a
    proportional jitter factor drawn uniformly from `[1 - jitter, 1 + jitter]`, then raised to
    the server's `Retry-After` if that is larger, capped at `max_delay_s`, and clipped to what is
    left of `max_wait_s`. Unlike the reference SDK, which ignores `Retry-After` on control-plane
    calls, we honour it as a floor: a 429/503 that names its own back-off gets it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_wait_s: float = Field(default=300.0, ge=0)
    base_delay_s: float = Field(default=1.0, ge=0)
    max_delay_s: float = Field(default=30.0, ge=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    retry_statuses: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
    retry_exceptions: tuple[type[Exception], ...] = RETRYABLE_TRANSPORT_ERRORS

    def backoff_s(
        self, attempt: int, *, retry_after_s: float | None = None, u: float = 0.5
    ) -> float:
        """The delay before retry `attempt + 1`; `u` in [0, 1) draws the jitter (0.5: none)."""
        growth: float = 2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT)
        exponential = min(self.base_delay_s * growth, self.max_delay_s)
        delay = exponential * (1.0 + self.jitter * (2.0 * u - 1.0))
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, self.max_delay_s)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP-date), never negative; None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def response_json(response: httpx.Response, what: str) -> dict[str, Any]:
    """The JSON object of a successful answer; FireworksError if it is anything else."""
    try:
        body = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        body = None
    if not isinstance(body, dict):
        raise FireworksError(
            f"{what}: expected a JSON object from the platform (HTTP {response.status_code})",
            status_code=response.status_code,
        )
    return body


def tls_verify_default(url: str) -> bool:
    """Verify TLS only for `https` URLs whose host is a name, not an IP literal."""
    parsed = httpx.URL(url)
    if parsed.scheme != "https":
        return False
    try:
        ipaddress.ip_address(parsed.host)
    except ValueError:
        return True
    return False


def auth_headers(
    api_key: str,
    additional: Mapping[str, str],
    extra: Mapping[str, str] | None,
    *,
    bearer: bool,
) -> dict[str, str]:
    """Headers in order: JSON, `X-Api-Key`, the constructor's headers, per-call extras, Bearer."""
    headers = {"Content-Type": "application/json", "X-Api-Key": api_key}
    headers.update(additional)
    headers.update(extra or {})
    if bearer:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def transport_error(exc: Exception, what: str, api_key: str) -> APIConnectionError:
    """The typed error for a request that got no (complete) answer, the key scrubbed.

    A failure off the retry list (a proxy or local protocol error) is not `retryable`.
    """
    detail = str(exc).replace(api_key, "***") if api_key else str(exc)
    text = f"({type(exc).__name__}: {detail})"
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"{what} timed out {text}")
    error = APIConnectionError(f"{what} got no answer {text}")
    if not isinstance(exc, RETRYABLE_TRANSPORT_ERRORS):
        error.retryable = False  # an instance flag, as ServerError does for 501
    return error


class _Budget:
    """Time left for retries. Counts the larger of wall time and time slept, so an injected
    no-op `sleep` still runs the budget down instead of looping forever."""

    def __init__(self, total_s: float, clock: Callable[[], float]) -> None:
        self._total_s = total_s
        self._clock = clock
        self._start = clock()
        self._slept_s = 0.0

    def remaining_s(self) -> float:
        return self._total_s - max(self._clock() - self._start, self._slept_s)

    def spend(self, delay_s: float, sleep: Callable[[float], None]) -> None:
        self._slept_s += delay_s
        sleep(delay_s)


class HttpClient(ClosesOnExit):
    """An authenticated, retrying HTTP client for one control-plane base URL.

    `transport=` (e.g. `httpx.MockTransport`) or `http_client=` inject the wire (tests, proxies);
    either then owns TLS settings, and an injected `http_client` is the caller's to close.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str,
        *,
        additional_headers: Mapping[str, str] | None = None,
        verify_ssl: bool | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = normalize_url(base_url, field="base_url")
        self.retry = retry or RetryPolicy()
        self._api_key = api_key
        self._additional_headers = dict(additional_headers or {})
        self._verify_ssl = verify_ssl
        self._transport = transport
        self._sleep = sleep
        self._clock = clock
        self._owns_client = http_client is None
        self._client = http_client or self._new_client(self._verify_for(self.base_url))

    def __repr__(self) -> str:
        return f"HttpClient(base_url={self.base_url!r})"

    @property
    def api_key(self) -> str:
        """The key, for clients built from this one (e.g. a sampler); never logged."""
        return self._api_key

    @property
    def additional_headers(self) -> dict[str, str]:
        """A copy of the constructor's extra headers."""
        return dict(self._additional_headers)

    @property
    def verify_ssl(self) -> bool | None:
        """The explicit TLS setting (None: decided per URL)."""
        return self._verify_ssl

    def close(self) -> None:
        """Close the underlying httpx client if this object created it."""
        if self._owns_client:
            self._client.close()

    def url(self, path_or_url: str) -> str:
        """An absolute URL: `path_or_url` itself, or the path joined to the base URL."""
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        bearer: bool = False,
        retry: bool = True,
        ok_statuses: Collection[int] = (),
    ) -> httpx.Response:
        """Send with retries; return a 2xx response or one whose status is in `ok_statuses`.

        Anything else raises: an `APIStatusError` subclass for an HTTP answer (also after the
        retry budget ran out on a retryable status), `APIConnectionError`/`APITimeoutError`
        when no answer came.
        """
        method = method.upper()
        url = self.url(path_or_url)
        what = f"{method} {httpx.URL(url).path}"
        request_kwargs: dict[str, Any] = {
            "params": params,
            "json": json,
            "headers": self._headers(headers, bearer=bearer),
            "timeout": timeout if timeout is not None else self._timeout_for(method),
        }
        response = self._send_with_retries(method, url, what, request_kwargs, retry, ok_statuses)
        if response.is_success or response.status_code in ok_statuses:
            return response
        raise self.error_for(response, what)

    def probe(
        self, method: str, url: str, *, json: Any = None, timeout: float, bearer: bool = True
    ) -> bool:
        """One attempt, no retries: True only on HTTP 200. Failures are an answer, not errors."""
        headers = self._headers(None, bearer=bearer)
        try:
            response = self._send(method.upper(), url, json=json, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            logger.debug("probe %s %s: %s", method, httpx.URL(url).path, type(exc).__name__)
            return False
        return response.status_code == 200

    def error_for(
        self, response: httpx.Response, what: str, *, advice: str | None = None
    ) -> APIStatusError:
        """The typed error for `response`, with the API key scrubbed from the server message."""
        return status_error(response, what, advice=advice, redact=(self._api_key,))

    def _headers(self, extra: Mapping[str, str] | None, *, bearer: bool) -> dict[str, str]:
        return auth_headers(self._api_key, self._additional_headers, extra, bearer=bearer)

    @staticmethod
    def _timeout_for(method: str) -> float:
        return _TIMEOUT_BY_VERB.get(method, _DEFAULT_TIMEOUT_S)

    def _verify_for(self, url: str) -> bool:
        return self._verify_ssl if self._verify_ssl is not None else tls_verify_default(url)

    def _new_client(self, verify: bool) -> httpx.Client:
        return httpx.Client(transport=self._transport, verify=verify, timeout=_DEFAULT_TIMEOUT_S)

    def _needs_one_off_client(self, url: str) -> bool:
        # An injected transport or client owns TLS itself (and closing a one-off client would
        # close an injected transport with it).
        owns_tls = self._owns_client and self._transport is None
        return owns_tls and self._verify_for(url) != self._verify_for(self.base_url)

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One attempt. A URL whose TLS policy differs from the base URL's gets a one-off client."""
        try:
            if self._needs_one_off_client(url):
                with self._new_client(self._verify_for(url)) as one_off:
                    return one_off.request(method, url, **kwargs)
            return self._client.request(method, url, **kwargs)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise ConfigError(f"invalid URL for {method} {url}: {exc}") from None

    def _send_with_retries(
        self,
        method: str,
        url: str,
        what: str,
        request_kwargs: dict[str, Any],
        retry: bool,
        ok_statuses: Collection[int],
    ) -> httpx.Response:
        policy = self.retry
        budget = _Budget(policy.max_wait_s if retry else 0.0, self._clock)
        attempt = 0
        while True:
            try:
                response = self._send(method, url, **request_kwargs)
            except policy.retry_exceptions as exc:
                delay = self._next_delay(budget, attempt, None)
                if delay is None:
                    raise self._connection_error(exc, what) from exc
                self._log_retry(what, type(exc).__name__, attempt, delay)
            except httpx.TransportError as exc:  # not on the retry list: fail at once
                raise self._connection_error(exc, what) from exc
            else:
                status = response.status_code
                if status not in policy.retry_statuses or status in ok_statuses:
                    return response
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                delay = self._next_delay(budget, attempt, retry_after)
                if delay is None:
                    return response  # the caller raises the typed status error
                self._log_retry(what, f"HTTP {status}", attempt, delay)
            budget.spend(delay, self._sleep)
            attempt += 1

    def _next_delay(
        self, budget: _Budget, attempt: int, retry_after_s: float | None
    ) -> float | None:
        remaining = budget.remaining_s()
        if remaining <= 0:
            return None
        delay = self.retry.backoff_s(attempt, retry_after_s=retry_after_s, u=random.random())
        return min(delay, remaining)

    @staticmethod
    def _log_retry(what: str, reason: str, attempt: int, delay: float) -> None:
        logger.warning("%s: %s; retry %d in %.2fs", what, reason, attempt + 1, delay)

    def _connection_error(self, exc: Exception, what: str) -> APIConnectionError:
        return transport_error(exc, what, self._api_key)


class AsyncHttpClient:
    """The sampler's authenticated async client: one attempt per `post`, no retry loop.

    httpx's async connection pool belongs to the event loop that opened it, and a sampler may be
    driven from several loops over its life (one `asyncio.run` per evaluation, a background loop
    in `FiretitanSamplingClient`), so one pooled client is kept per running loop. An injected
    `http_client` is used as it is (and is the caller's to close).
    """

    def __init__(
        self,
        api_key: str,
        base_url: str,
        *,
        additional_headers: Mapping[str, str] | None = None,
        verify_ssl: bool | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = normalize_url(base_url, field="inference_url")
        self._api_key = api_key
        self._additional_headers = dict(additional_headers or {})
        self._verify = verify_ssl if verify_ssl is not None else tls_verify_default(base_url)
        self._transport = transport
        self._injected = http_client
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"AsyncHttpClient(base_url={self.base_url!r})"

    async def post(
        self,
        path: str,
        *,
        json: Any,
        headers: Mapping[str, str] | None = None,
        read_timeout_s: float = _ASYNC_READ_S,
    ) -> httpx.Response:
        """POST once and read the whole body; any status comes back, transport failures raise
        the typed errors of `transport_error`."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        timeout = httpx.Timeout(_ASYNC_CONNECT_S, read=read_timeout_s)
        sent_headers = auth_headers(self._api_key, self._additional_headers, headers, bearer=True)
        try:
            return await self._client().post(url, json=json, headers=sent_headers, timeout=timeout)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise ConfigError(f"invalid URL for POST {url}: {exc}") from None
        except httpx.TransportError as exc:
            raise transport_error(exc, f"POST {httpx.URL(url).path}", self._api_key) from exc

    def error_for(self, response: httpx.Response, what: str) -> APIStatusError:
        """The typed error for a non-2xx `response`, with the API key scrubbed."""
        return status_error(response, what, redact=(self._api_key,))

    async def aclose(self) -> None:
        """Close the pooled client of the running loop (others close with their loops)."""
        client = self._by_loop.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        if self._injected is not None:
            return self._injected
        loop = asyncio.get_running_loop()
        client = self._by_loop.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                transport=self._transport,
                verify=self._verify,
                limits=_ASYNC_LIMITS,
                timeout=httpx.Timeout(_ASYNC_CONNECT_S, read=_ASYNC_READ_S),
            )
            self._by_loop[loop] = client
        return client
