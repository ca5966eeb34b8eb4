"""`HttpClient` on `httpx.MockTransport`: headers, timeouts, the retry loop and its budget,
`Retry-After`, typed errors, probes, TLS policy."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from sdk._http import (
    HttpClient,
    RetryPolicy,
    parse_retry_after,
    response_json,
    tls_verify_default,
)
from sdk.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    FireworksError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)
from tests.sdk.fakes import API_KEY, BASE_URL, FakeClock, rpc_error

Answer = httpx.Response | Exception


class ScriptedServer:
    """Answers each request with the next scripted answer; the last one repeats."""

    def __init__(self, answers: Iterable[Answer]) -> None:
        self.answers = deque(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.popleft() if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(
    server: ScriptedServer,
    clock: FakeClock,
    retry: RetryPolicy | None = None,
    **kwargs: object,
) -> HttpClient:
    return HttpClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(server),
        retry=retry or RetryPolicy(jitter=0.0),
        sleep=clock.sleep,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


OK = httpx.Response(200, json={"ok": True})


def test_control_plane_headers_and_bearer_on_request(clock: FakeClock) -> None:
    server = ScriptedServer([OK])
    client = make_client(server, clock, additional_headers={"X-Extra": "1"})
    client.request("GET", "/v1/a", headers={"X-Call": "2"})
    client.request("GET", "/v1/b", bearer=True)
    plain, bearer = server.requests
    assert plain.headers["content-type"] == "application/json"
    assert plain.headers["x-api-key"] == API_KEY
    assert plain.headers["x-extra"] == "1"
    assert plain.headers["x-call"] == "2"
    assert "authorization" not in plain.headers
    assert bearer.headers["authorization"] == f"Bearer {API_KEY}"
    assert str(plain.url) == f"{BASE_URL}/v1/a"


@pytest.mark.parametrize(
    ("method", "expected"), [("GET", 30.0), ("POST", 60.0), ("DELETE", 60.0), ("PATCH", 60.0)]
)
def test_per_verb_timeouts(method: str, expected: float, clock: FakeClock) -> None:
    server = ScriptedServer([OK])
    make_client(server, clock).request(method, "/v1/x")
    assert server.requests[0].extensions["timeout"]["read"] == expected


def test_per_call_timeout_overrides_the_verb_default(clock: FakeClock) -> None:
    server = ScriptedServer([OK])
    make_client(server, clock).request("GET", "/v1/x", timeout=7.0)
    assert server.requests[0].extensions["timeout"]["connect"] == 7.0


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_status_then_success(status: int, clock: FakeClock) -> None:
    server = ScriptedServer([rpc_error(status, "transient"), rpc_error(status, "again"), OK])
    response = make_client(server, clock).request("POST", "/v1/x", json={"a": 1})
    assert response.status_code == 200
    assert len(server.requests) == 3
    assert clock.sleeps == [1.0, 2.0]  # base 1 s, doubling
    assert all(r.content == b'{"a":1}' for r in server.requests)  # POSTs are retried too


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        httpx.ReadTimeout("slow read"),
        httpx.RemoteProtocolError("peer closed"),
        httpx.ReadError("reset"),
        httpx.WriteError("broken pipe"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_error_then_success(exc: Exception, clock: FakeClock) -> None:
    server = ScriptedServer([exc, OK])
    assert make_client(server, clock).request("GET", "/v1/x").status_code == 200
    assert clock.sleeps == [1.0]


def test_backoff_is_capped_and_clipped_to_the_budget_then_typed_error(clock: FakeClock) -> None:
    server = ScriptedServer([rpc_error(503, "down")])
    policy = RetryPolicy(max_wait_s=10.0, base_delay_s=1.0, max_delay_s=4.0, jitter=0.0)
    with pytest.raises(ServerError) as caught:
        make_client(server, clock, policy).request("GET", "/v1/x")
    assert clock.sleeps == [1.0, 2.0, 4.0, 3.0]  # 4 is the cap; the last delay is what's left
    assert len(server.requests) == 5
    assert caught.value.status_code == 503
    assert caught.value.server_message == "down"


def test_rate_limit_exhaustion_raises_rate_limit_error(clock: FakeClock) -> None:
    server = ScriptedServer([rpc_error(429, "slow down")])
    policy = RetryPolicy(max_wait_s=2.0, jitter=0.0)
    with pytest.raises(RateLimitError):
        make_client(server, clock, policy).request("GET", "/v1/x")


@pytest.mark.parametrize(
    ("exc", "error_cls"),
    [
        (httpx.ConnectError("refused"), APIConnectionError),
        (httpx.ReadTimeout("slow"), APITimeoutError),
    ],
    ids=["connect", "timeout"],
)
def test_transport_exhaustion_raises_chained_connection_error(
    exc: Exception, error_cls: type[APIConnectionError], clock: FakeClock
) -> None:
    server = ScriptedServer([exc])
    policy = RetryPolicy(max_wait_s=5.0, jitter=0.0)
    with pytest.raises(error_cls) as caught:
        make_client(server, clock, policy).request("GET", "/v1/x")
    assert type(caught.value) is error_cls
    assert caught.value.__cause__ is exc
    assert "GET /v1/x" in str(caught.value)
    assert sum(clock.sleeps) == pytest.approx(5.0)


def test_a_transport_error_off_the_retry_list_fails_at_once(clock: FakeClock) -> None:
    server = ScriptedServer([httpx.LocalProtocolError("bad request line")])
    with pytest.raises(APIConnectionError):
        make_client(server, clock).request("GET", "/v1/x")
    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_retry_after_seconds_is_a_floor(clock: FakeClock) -> None:
    limited = httpx.Response(429, json={"message": "slow"}, headers={"Retry-After": "7"})
    server = ScriptedServer([limited, OK])
    make_client(server, clock).request("GET", "/v1/x")
    assert clock.sleeps == [7.0]


def test_retry_after_below_the_backoff_does_not_shorten_it(clock: FakeClock) -> None:
    limited = httpx.Response(503, json={"message": "busy"}, headers={"Retry-After": "0"})
    server = ScriptedServer([limited, limited, OK])
    make_client(server, clock).request("GET", "/v1/x")
    assert clock.sleeps == [1.0, 2.0]


def test_retry_after_is_capped_at_max_delay_and_the_budget(clock: FakeClock) -> None:
    limited = httpx.Response(503, json={"message": "busy"}, headers={"Retry-After": "3600"})
    server = ScriptedServer([limited, OK])
    make_client(server, clock).request("GET", "/v1/x")
    assert clock.sleeps == [30.0]

    clock.sleeps.clear()
    server = ScriptedServer([limited, OK])
    make_client(server, clock, RetryPolicy(max_wait_s=12.0, jitter=0.0)).request("GET", "/v1/x")
    assert clock.sleeps == [12.0]


def test_retry_after_http_date_is_honoured(clock: FakeClock) -> None:
    when = datetime.now(UTC) + timedelta(seconds=20)
    limited = httpx.Response(
        503, json={"message": "busy"}, headers={"Retry-After": format_datetime(when, usegmt=True)}
    )
    server = ScriptedServer([limited, OK])
    make_client(server, clock).request("GET", "/v1/x")
    (slept,) = clock.sleeps
    assert 17.0 <= slept <= 20.0


@pytest.mark.parametrize(
    ("status", "error_cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
    ],
)
def test_client_errors_are_never_retried(
    status: int, error_cls: type[Exception], clock: FakeClock
) -> None:
    server = ScriptedServer([rpc_error(status, "no")])
    with pytest.raises(error_cls):
        make_client(server, clock).request("GET", "/v1/x")
    assert len(server.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("status", [404, 409])
def test_ok_statuses_are_returned_not_raised(status: int, clock: FakeClock) -> None:
    server = ScriptedServer([rpc_error(status, "expected")])
    response = make_client(server, clock).request("GET", "/v1/x", ok_statuses=(status,))
    assert response.status_code == status


def test_retry_false_makes_one_attempt(clock: FakeClock) -> None:
    server = ScriptedServer([rpc_error(503, "down"), OK])
    with pytest.raises(ServerError):
        make_client(server, clock).request("GET", "/v1/x", retry=False)
    assert len(server.requests) == 1


def test_a_no_op_sleep_still_ends_the_retry_loop() -> None:
    """The budget counts time slept too, so a real clock plus a fake sleep cannot spin forever."""
    server = ScriptedServer([rpc_error(503, "down")])
    client = HttpClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(server),
        retry=RetryPolicy(max_wait_s=100.0, jitter=0.0),
        sleep=lambda _: None,
    )
    with pytest.raises(ServerError):
        client.request("GET", "/v1/x")
    assert 3 <= len(server.requests) <= 10


def test_retries_are_logged_without_headers(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = ScriptedServer([rpc_error(502, "bad gateway"), OK])
    with caplog.at_level(logging.WARNING, logger="sdk._http"):
        make_client(server, clock).request("GET", "/v1/things")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "GET /v1/things: HTTP 502; retry 1 in 1.00s"
    assert API_KEY not in caplog.text


@pytest.mark.parametrize(
    ("answer", "healthy"),
    [
        (httpx.Response(200, json={"status": "ok"}), True),
        (httpx.Response(204), False),
        (rpc_error(503, "starting"), False),
        (httpx.ConnectError("refused"), False),
        (httpx.ReadTimeout("slow"), False),
    ],
    ids=["200", "204", "503", "connect-error", "timeout"],
)
def test_probe_is_one_attempt_and_never_raises(
    answer: Answer, healthy: bool, clock: FakeClock
) -> None:
    server = ScriptedServer([answer])
    client = make_client(server, clock)
    assert client.probe("GET", f"{BASE_URL}/healthz", timeout=5.0) is healthy
    assert len(server.requests) == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert server.requests[0].extensions["timeout"]["read"] == 5.0
    assert clock.sleeps == []


def test_response_json_rejects_non_objects() -> None:
    with pytest.raises(FireworksError, match="expected a JSON object"):
        response_json(httpx.Response(200, text="<html>"), "GET /x")
    with pytest.raises(FireworksError):
        response_json(httpx.Response(200, json=[1, 2]), "GET /x")


@pytest.mark.parametrize(
    ("url", "verify"),
    [
        ("https://api.fireworks.ai", True),
        ("http://api.fireworks.ai", False),
        ("https://10.0.0.1:8443", False),
        ("https://[::1]:8443", False),
        ("http://127.0.0.1:8000", False),
    ],
)
def test_tls_verification_rule(url: str, verify: bool) -> None:
    assert tls_verify_default(url) is verify


def test_backoff_jitter_stays_within_its_band() -> None:
    policy = RetryPolicy(base_delay_s=2.0, max_delay_s=100.0, jitter=0.5)
    assert policy.backoff_s(1, u=0.0) == pytest.approx(2.0)  # 4 * 0.5
    assert policy.backoff_s(1, u=0.5) == pytest.approx(4.0)
    assert policy.backoff_s(1, u=0.999999) == pytest.approx(6.0, rel=1e-5)  # 4 * 1.5
    assert policy.backoff_s(200) == 100.0  # no overflow on long budgets


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("soon", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_date_relative_to_now() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Tue, 01 Jan 2030 12:00:30 GMT", now=now) == 30.0


def test_owned_client_is_closed_and_injected_one_is_not(clock: FakeClock) -> None:
    server = ScriptedServer([OK])
    injected = httpx.Client(transport=httpx.MockTransport(server))
    with HttpClient(API_KEY, BASE_URL, http_client=injected) as client:
        client.request("GET", "/v1/x")
    assert not injected.is_closed
    injected.close()

    owned = make_client(server, clock)
    with owned:
        pass
    with pytest.raises(RuntimeError):  # httpx refuses requests on a closed client
        owned.request("GET", "/v1/x")


def test_absolute_urls_with_another_tls_policy_still_use_the_transport(clock: FakeClock) -> None:
    server = ScriptedServer([OK])
    client = make_client(server, clock)
    client.request("POST", "http://127.0.0.1:9/inference/v1/completions", json={})
    assert str(server.requests[0].url) == "http://127.0.0.1:9/inference/v1/completions"


@pytest.mark.parametrize("base_url", ["api.fireworks.ai", "ftp://x", "https://"])
def test_bad_base_url_is_a_config_error(base_url: str) -> None:
    with pytest.raises(ConfigError, match="base_url"):
        HttpClient(API_KEY, base_url)


def test_repr_shows_no_key(clock: FakeClock) -> None:
    client = make_client(ScriptedServer([OK]), clock)
    assert API_KEY not in repr(client)


def test_one_off_clients_only_when_the_tls_policy_differs_and_we_own_tls() -> None:
    own = HttpClient(API_KEY, "https://api.example.test")
    assert own._needs_one_off_client("http://127.0.0.1:9/inference")
    assert not own._needs_one_off_client("https://api.example.test/v1/x")
    assert not HttpClient(API_KEY, BASE_URL, verify_ssl=True)._needs_one_off_client(
        "http://127.0.0.1:9/inference"
    )
    injected = HttpClient(API_KEY, BASE_URL, transport=httpx.MockTransport(ScriptedServer([OK])))
    assert not injected._needs_one_off_client("http://127.0.0.1:9/inference")
