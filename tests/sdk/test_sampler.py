"""`DeploymentSampler` against a fake SSE completions endpoint: the request, stream parsing and
truncation, echo handling, the retry loop (backoff, `Retry-After`, hotload waits, exhaustion and
its error fields), the logical request id, concurrency slots, and the tinker-shaped wrapper."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import pytest
from tinker import types

from backend.models.tokenizers import build_byte_tokenizer
from sdk import (
    AdaptiveConcurrencyController,
    BadRequestError,
    ConfigError,
    DeploymentSampler,
    DeploymentSamplerTimeoutError,
    FiretitanSamplingClient,
    FireworksError,
    FixedConcurrencyController,
    SamplerRetryPolicy,
    SamplingRequestError,
    ServerMetrics,
)
from sdk._sse import parse_stream
from tests.sdk.fakes import API_KEY, BASE_URL, rpc_error
from tests.sdk.serving_fakes import (
    DEP_NAME,
    FakeServing,
    logprob_of,
    sse_events,
    sse_response,
    truncated_response,
)

T = TypeVar("T")
PROMPT = [5, 6, 7]
FAST = SamplerRetryPolicy(base_delay_s=0.002, max_delay_s=0.03)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


class Sleeps:
    """An async sleep that records and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class RecordingController:
    """A concurrency controller that counts slots and keeps what each release reported."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.acquired = 0
        self.released: list[ServerMetrics | None] = []

    @property
    def window_size(self) -> int:
        return 1

    async def acquire(self) -> None:
        self.in_flight += 1
        self.acquired += 1

    def release(self, metrics: ServerMetrics | None = None) -> None:
        self.in_flight -= 1
        self.released.append(metrics)

    def step_completed(self) -> dict[str, float]:
        return {}


@pytest.fixture
def serving() -> FakeServing:
    return FakeServing()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_sampler(serving: FakeServing, sleeps: Sleeps, **kwargs: Any) -> DeploymentSampler:
    kwargs.setdefault("retry_policy", FAST)
    return DeploymentSampler(
        BASE_URL,
        DEP_NAME,
        API_KEY,
        transport=serving.transport(),
        sleep=sleeps,
        rng=lambda: 0.5,
        **kwargs,
    )


@pytest.fixture
def sampler(serving: FakeServing, sleeps: Sleeps) -> DeploymentSampler:
    return make_sampler(serving, sleeps)


def _bodies(serving: FakeServing) -> list[dict[str, Any]]:
    return [json.loads(r.content) for r in serving.completions]


# -- the request ----------------------------------------------------------------------------


def test_request_body_and_headers(sampler: DeploymentSampler, serving: FakeServing) -> None:
    run(sampler.sample_with_prompt_tokens(PROMPT, max_tokens=3))
    (request,) = serving.completions
    assert request.url == f"{BASE_URL}/inference/v1/completions"
    assert json.loads(request.content) == {
        "model": DEP_NAME,
        "prompt": PROMPT,
        "n": 1,
        "max_tokens": 3,
        "temperature": 1.0,
        "stream": True,
        "perf_metrics_in_response": True,
        "raw_output": True,
        "top_p": 1.0,
        "top_k": 0,
        "logprobs": True,
    }
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert len(request.headers["x-request-id"]) == 32  # a hex uuid
    int(request.headers["x-request-id"], 16)


def test_caller_kwargs_win_and_images_ask_for_token_ids(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    run(sampler.async_completions_stream(PROMPT, 3, top_k=40, seed=7, images=["img"]))
    body = _bodies(serving)[0]
    assert (body["top_k"], body["seed"], body["return_token_ids"]) == (40, 7, True)


def test_a_completion_is_assembled_from_its_chunks(sampler: DeploymentSampler) -> None:
    (sample,) = run(sampler.sample_with_prompt_tokens(PROMPT, max_tokens=3))
    assert sample.full_tokens == [5, 6, 7, 8, 9, 10]
    assert (sample.prompt_len, sample.completion_len) == (3, 3)
    assert sample.completion_tokens == [8, 9, 10]
    assert sample.text == "t8 t9 t10 "
    assert sample.finish_reason == "length"
    assert sample.inference_logprobs == [logprob_of(i) for i in range(3)]
    assert sample.sampling_logprobs == [logprob_of(i) - 0.5 for i in range(3)]
    assert not sample.logprobs_echoed


def test_metrics_are_collected_and_drained(sampler: DeploymentSampler) -> None:
    result, metrics = run(sampler.async_completions_stream(PROMPT, 2))
    assert result.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert (metrics.prefill_queue_duration, metrics.prompt_tokens) == (0.25, 3.0)
    assert metrics.attempts == 1
    assert sampler.drain_metrics() == [metrics]
    assert sampler.drain_metrics() == []


def test_perf_metrics_fall_back_to_response_headers() -> None:
    metrics = ServerMetrics.from_response(
        {"prompt-tokens": 4},
        {"prefill-queue-duration": "0.75", "cached-prompt-tokens": "oops"},
        client_latency_s=0.1,
        attempts=2,
    )
    assert (metrics.prompt_tokens, metrics.prefill_queue_duration) == (4.0, 0.75)
    assert metrics.cached_prompt_tokens is None  # malformed: dropped, not fatal


# -- stream parsing ---------------------------------------------------------------------------


def test_parse_stream_skips_comments_and_detects_done() -> None:
    body = sse_response(PROMPT).text
    parsed = parse_stream(body)
    assert parsed.saw_done and not parsed.truncated
    assert len(parsed.result.choices[0].logprobs) == 3


def test_a_stream_without_done_but_with_a_final_chunk_is_complete() -> None:
    parsed = parse_stream(sse_response(PROMPT, done=False).text)
    assert not parsed.saw_done and not parsed.truncated


def test_a_cut_off_stream_is_a_truncation() -> None:
    parsed = parse_stream(truncated_response(PROMPT).text)
    assert parsed.truncated
    assert parsed.result.choices[0].text == "t8 "


def test_a_plain_json_answer_parses_as_one_chunk() -> None:
    chunk = json.loads(sse_events(PROMPT, max_tokens=1)[-1])
    parsed = parse_stream(json.dumps(chunk))
    assert not parsed.truncated
    assert parsed.result.choices[0].raw_output is not None


# -- echo and the parsing rules ---------------------------------------------------------------


def test_echo_strips_the_prompt_and_aligns_logprobs(sampler: DeploymentSampler) -> None:
    (sample,) = run(sampler.sample_with_prompt_tokens(PROMPT, max_tokens=2, echo=True))
    assert sample.full_tokens == [5, 6, 7, 8, 9]
    assert (sample.prompt_len, sample.completion_len) == (3, 2)
    assert sample.logprobs_echoed
    # P + C - 1 entries, aligned with full_tokens[1:]: prompt positions 1..2, then completions.
    assert sample.inference_logprobs == [-2.0, -3.0, logprob_of(0), logprob_of(1)]


def test_an_echo_that_does_not_start_with_the_prompt_is_refused(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    events = sse_events(PROMPT, max_tokens=2, echo=True)
    final = json.loads(events[-1])
    final["choices"][0]["raw_output"]["completion_token_ids"] = [9, 9, 9, 8, 9]
    body = "".join(f"data: {e}\n\n" for e in [*events[:-1], json.dumps(final)])
    serving.canned_completions.append(httpx.Response(200, text=body + "data: [DONE]\n\n"))
    with pytest.raises(FireworksError, match="do not start with the prompt"):
        run(sampler.sample_with_prompt_tokens(PROMPT, max_tokens=2, echo=True))


def test_raw_output_is_mandatory(sampler: DeploymentSampler, serving: FakeServing) -> None:
    serving.canned_completions.append(sse_response(PROMPT, with_raw_output=False))
    with pytest.raises(FireworksError, match="raw_output"):
        run(sampler.sample_with_prompt_tokens(PROMPT))


def test_raw_logprobs_stand_in_for_missing_sampling_logprobs_at_full_distribution(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    serving.canned_completions.extend(
        [
            sse_response(PROMPT, sampling_logprobs=False),
            sse_response(PROMPT, sampling_logprobs=False),
        ]
    )
    (full,) = run(sampler.sample_with_prompt_tokens(PROMPT))
    assert full.sampling_logprobs == full.inference_logprobs
    (tempered,) = run(sampler.sample_with_prompt_tokens(PROMPT, temperature=0.7))
    assert tempered.sampling_logprobs == [None, None, None]


def test_too_long_completions_are_dropped(sampler: DeploymentSampler) -> None:
    samples = run(sampler.sample_with_prompt_tokens(PROMPT, n=2, max_tokens=3, max_seq_len=5))
    assert samples == []


def test_a_prompt_that_fills_max_seq_len_sends_nothing(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    assert run(sampler.sample_with_prompt_tokens(PROMPT, max_seq_len=3)) == []
    assert serving.completions == []


# -- tokenizers and stop tokens ----------------------------------------------------------------


def test_chat_messages_are_rendered_by_a_transformers_tokenizer(
    serving: FakeServing, sleeps: Sleeps
) -> None:
    tokenizer = build_byte_tokenizer("chatml")  # transformers 5: a BatchEncoding comes back
    sampler = make_sampler(serving, sleeps, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "ab"}]
    run(sampler.sample_with_tokens(messages, max_tokens=1))
    expected: Any = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )
    assert _bodies(serving)[0]["prompt"] == list(expected["input_ids"])


class ListTokenizer:
    """A tokenizer whose chat template answers a plain list (transformers 4 style)."""

    def apply_chat_template(self, conversation: Any, /, **kwargs: Any) -> list[int]:
        assert kwargs == {"tokenize": True, "add_generation_prompt": True}
        return [1, 2, 3, 4]

    def decode(self, token_ids: Any, /, **kwargs: Any) -> str:
        assert kwargs == {"skip_special_tokens": False}
        return f"<{token_ids[0]}>"


def test_list_tokenizers_and_prompt_length_checks(serving: FakeServing, sleeps: Sleeps) -> None:
    sampler = make_sampler(serving, sleeps, tokenizer=ListTokenizer())
    assert run(sampler.sample_with_tokens([{"role": "user", "content": "x"}], max_seq_len=4)) == []
    run(sampler.sample_with_tokens([{"role": "user", "content": "x"}], max_tokens=1))
    assert _bodies(serving)[0]["prompt"] == [1, 2, 3, 4]


def test_stop_token_ids_are_decoded_one_each(serving: FakeServing, sleeps: Sleeps) -> None:
    sampler = make_sampler(serving, sleeps, tokenizer=ListTokenizer())
    run(sampler.sample_with_prompt_tokens(PROMPT, stop=[258, 10]))
    run(sampler.sample_with_prompt_tokens(PROMPT, stop=["</s>"]))
    assert [b["stop"] for b in _bodies(serving)] == [["<258>", "<10>"], ["</s>"]]
    with pytest.raises(ConfigError, match="not a mix"):
        run(sampler.sample_with_prompt_tokens(PROMPT, stop=["a", 1]))  # type: ignore[arg-type]


def test_token_stops_and_chat_need_a_tokenizer(sampler: DeploymentSampler) -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        run(sampler.sample_with_prompt_tokens(PROMPT, stop=[1]))
    with pytest.raises(ConfigError, match="tokenizer"):
        run(sampler.sample_with_tokens([{"role": "user", "content": "x"}]))


# -- retries of one logical completion ---------------------------------------------------------


def test_a_truncated_stream_is_retried(
    sampler: DeploymentSampler, serving: FakeServing, sleeps: Sleeps
) -> None:
    serving.canned_completions.append(truncated_response(PROMPT))
    (sample,) = run(sampler.sample_with_prompt_tokens(PROMPT, max_tokens=3))
    assert sample.completion_len == 3
    assert len(serving.completions) == 2
    assert sleeps.calls == [pytest.approx(0.002)]


def test_503_then_success_and_the_logical_id_is_constant(
    sampler: DeploymentSampler, serving: FakeServing, sleeps: Sleeps
) -> None:
    serving.canned_completions.extend([rpc_error(503, "busy", 14), rpc_error(502, "bad gw", 14)])
    _, metrics = run(sampler.async_completions_stream(PROMPT, 2))
    assert metrics.attempts == 3
    ids = {r.headers["x-request-id"] for r in serving.completions}
    assert len(ids) == 1
    assert sleeps.calls == [pytest.approx(0.002), pytest.approx(0.004)]
    run(sampler.async_completions_stream(PROMPT, 2, logical_request_id="abc123"))
    assert serving.completions[-1].headers["x-request-id"] == "abc123"


def test_backoff_doubles_to_the_cap_with_jitter_and_a_retry_after_floor() -> None:
    policy = SamplerRetryPolicy()
    assert [policy.backoff_s(n, retry_after_s=None, u=0.5) for n in range(6)] == [
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert policy.backoff_s(0, retry_after_s=None, u=0.0) == 1.0  # factor 0.5
    assert policy.backoff_s(0, retry_after_s=None, u=0.999) == pytest.approx(2.998)  # < 1.5
    assert policy.backoff_s(0, retry_after_s=7, u=0.5) == 7.0
    assert policy.backoff_s(0, retry_after_s=90, u=0.5) == 30.0  # the floor is capped


def test_retry_after_is_honoured(
    sampler: DeploymentSampler, serving: FakeServing, sleeps: Sleeps
) -> None:
    limited = httpx.Response(429, json={"message": "slow"}, headers={"Retry-After": "0.02"})
    serving.canned_completions.append(limited)
    run(sampler.async_completions_stream(PROMPT, 1))
    assert sleeps.calls == [0.02]


def test_exhaustion_raises_with_every_field(serving: FakeServing, sleeps: Sleeps) -> None:
    context = {"run": "r1", "step": 4, "secret": "dropped"}
    sampler = make_sampler(serving, sleeps, request_context=context)
    busy = rpc_error(503, "busy", 14)
    busy.headers["x-fireworks-request-id"] = "srv-9"
    serving.canned_completions.extend([busy] * 7)
    with pytest.raises(SamplingRequestError) as caught:
        run(sampler.async_completions_stream(PROMPT, 1, logical_request_id="feed"))
    error = caught.value
    assert type(error) is SamplingRequestError and error.retryable
    assert (error.logical_request_id, error.model, error.attempts) == ("feed", DEP_NAME, 7)
    assert (error.final_status, error.final_error_kind, error.request_id) == (
        503,
        "http_status",
        "srv-9",
    )
    assert error.context == {"run": "r1", "step": 4}
    assert len(sleeps.calls) == 6
    clone = pickle.loads(pickle.dumps(error))
    assert clone.__dict__ == error.__dict__


@pytest.mark.parametrize(
    ("answer", "kind", "status"),
    [
        (rpc_error(504, "gateway timeout", 4), "http_status", 504),
        (rpc_error(408, "request timeout", 4), "http_status", 408),
        (httpx.ReadTimeout("slow"), "timeout", None),
    ],
    ids=["504", "408", "read-timeout"],
)
def test_timeouts_exhaust_as_timeout_errors(
    serving: FakeServing,
    sleeps: Sleeps,
    answer: httpx.Response | Exception,
    kind: str,
    status: int | None,
) -> None:
    sampler = make_sampler(serving, sleeps, retry_policy=SamplerRetryPolicy(max_attempts=2))
    serving.canned_completions.extend([answer, answer])
    with pytest.raises(DeploymentSamplerTimeoutError) as caught:
        run(sampler.async_completions_stream(PROMPT, 1))
    assert isinstance(caught.value, TimeoutError)
    assert (caught.value.final_error_kind, caught.value.final_status) == (kind, status)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("peer closed"),
        httpx.ReadError("reset"),
        httpx.WriteError("broken pipe"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_errors_are_retried(
    sampler: DeploymentSampler, serving: FakeServing, exc: Exception
) -> None:
    serving.canned_completions.append(exc)
    _, metrics = run(sampler.async_completions_stream(PROMPT, 1))
    assert metrics.attempts == 2


def test_connection_exhaustion_kind(serving: FakeServing, sleeps: Sleeps) -> None:
    sampler = make_sampler(serving, sleeps, retry_policy=SamplerRetryPolicy(max_attempts=3))
    serving.canned_completions.extend([httpx.ConnectError("refused")] * 3)
    with pytest.raises(SamplingRequestError) as caught:
        run(sampler.async_completions_stream(PROMPT, 1))
    assert (caught.value.final_error_kind, caught.value.final_status) == ("connection", None)


def test_other_statuses_raise_at_once(sampler: DeploymentSampler, serving: FakeServing) -> None:
    serving.canned_completions.append(rpc_error(400, "max_tokens too large"))
    with pytest.raises(BadRequestError, match="max_tokens too large"):
        run(sampler.async_completions_stream(PROMPT, 1))
    assert len(serving.completions) == 1


def test_425_while_hotloading_waits_then_serves_the_new_weights(
    sampler: DeploymentSampler, serving: FakeServing, sleeps: Sleeps
) -> None:
    serving.add_snapshot("s1")
    serving.replicas[0].loading, serving.replicas[0].ticks_left = "s1", 3
    (sample,) = run(
        sampler.sample_with_prompt_tokens(PROMPT, max_tokens=3, hotload_retry_interval=0.001)
    )
    assert sleeps.calls == [0.001, 0.001, 0.001]  # three 425s, then the load completed
    assert serving.replicas[0].identity == "s1"
    assert sample.completion_len == 3


@pytest.mark.parametrize("status", [404, 425])
def test_a_load_that_never_ends_exhausts_the_hotload_retries(
    sampler: DeploymentSampler, serving: FakeServing, sleeps: Sleeps, status: int
) -> None:
    serving.canned_completions.extend([rpc_error(status, "loading", 14)] * 4)
    with pytest.raises(SamplingRequestError) as caught:
        run(
            sampler.async_completions_stream(
                PROMPT, 1, hotload_retry_interval=0.5, hotload_max_retries=3
            )
        )
    assert (caught.value.final_status, caught.value.attempts) == (status, 4)
    assert sleeps.calls == [0.5, 0.5, 0.5]


def test_the_api_key_never_appears_in_sampler_errors(serving: FakeServing, sleeps: Sleeps) -> None:
    sampler = make_sampler(serving, sleeps, retry_policy=SamplerRetryPolicy(max_attempts=2))
    serving.canned_completions.append(rpc_error(401, f"bad key {API_KEY}", 16))
    with pytest.raises(FireworksError) as caught:
        run(sampler.async_completions_stream(PROMPT, 1))
    serving.canned_completions.extend([httpx.ConnectError(f"refused {API_KEY}")] * 2)
    with pytest.raises(SamplingRequestError) as exhausted:
        run(sampler.async_completions_stream(PROMPT, 1))
    for error in (caught.value, exhausted.value):
        clone = pickle.loads(pickle.dumps(error))
        for text in (str(error), repr(error), repr(error.__dict__), str(clone)):
            assert API_KEY not in text
    assert API_KEY not in repr(sampler)


# -- concurrency ------------------------------------------------------------------------------


def test_one_slot_per_attempt_released_with_metrics(serving: FakeServing, sleeps: Sleeps) -> None:
    controller = RecordingController()
    sampler = make_sampler(serving, sleeps, concurrency_controller=controller)
    serving.canned_completions.extend([rpc_error(503, "busy", 14), truncated_response(PROMPT)])
    run(sampler.sample_with_prompt_tokens(PROMPT))
    assert controller.acquired == 3 and controller.in_flight == 0
    assert controller.released[:2] == [None, None]
    last = controller.released[2]
    assert last is not None and last.prefill_queue_duration == 0.25


def test_slots_are_released_when_an_attempt_raises(serving: FakeServing, sleeps: Sleeps) -> None:
    controller = RecordingController()
    sampler = make_sampler(serving, sleeps, concurrency_controller=controller)
    serving.canned_completions.append(rpc_error(403, "forbidden", 7))
    with pytest.raises(FireworksError):
        run(sampler.sample_with_prompt_tokens(PROMPT))
    assert controller.in_flight == 0


def test_n_samples_are_independent_concurrent_requests(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    samples = run(sampler.sample_with_prompt_tokens(PROMPT, n=4, max_tokens=2))
    assert len(samples) == 4
    assert len({r.headers["x-request-id"] for r in serving.completions}) == 4


def test_controller_defaults_and_the_deprecated_max_concurrency(serving: FakeServing) -> None:
    default = DeploymentSampler(BASE_URL, DEP_NAME, API_KEY, transport=serving.transport())
    assert isinstance(default.concurrency_controller, AdaptiveConcurrencyController)
    assert default.concurrency_controller.window_size == 16
    with pytest.warns(DeprecationWarning, match="max_concurrency"):
        legacy = DeploymentSampler(BASE_URL, DEP_NAME, API_KEY, max_concurrency=3)
    assert isinstance(legacy.concurrency_controller, FixedConcurrencyController)
    assert legacy.concurrency_controller.window_size == 3
    with pytest.raises(ConfigError, match="not both"):
        DeploymentSampler(
            BASE_URL,
            DEP_NAME,
            API_KEY,
            concurrency_controller=FixedConcurrencyController(2),
            max_concurrency=2,
        )


def test_a_sampler_can_be_driven_from_successive_event_loops(sampler: DeploymentSampler) -> None:
    for _ in range(3):
        assert len(run(sampler.sample_with_prompt_tokens(PROMPT, n=2))) == 2


# -- FiretitanSamplingClient --------------------------------------------------------------------


def test_the_tinker_shaped_client_maps_params_and_results(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    params = types.SamplingParams(max_tokens=2, temperature=0.5, top_k=-1, seed=3, stop=["x"])
    with FiretitanSamplingClient(sampler) as client:
        future = client.sample(types.ModelInput.from_ints(PROMPT), 2, params)
        response = future.result(timeout=10)
    assert [s.tokens for s in response.sequences] == [[8, 9], [8, 9]]
    assert response.sequences[0].logprobs == [logprob_of(0) - 0.5, logprob_of(1) - 0.5]
    assert response.sequences[0].stop_reason == "length"
    assert response.prompt_logprobs is None
    body = _bodies(serving)[0]
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["seed"]) == (2, 0.5, 0, 3)
    assert (body["stop"], body["logprobs"]) == (["x"], True)


def test_prompt_logprobs_come_from_the_echo(
    sampler: DeploymentSampler, serving: FakeServing
) -> None:
    client = FiretitanSamplingClient(sampler)
    params = types.SamplingParams(max_tokens=2)
    response = run(client.sample_async(types.ModelInput.from_ints(PROMPT), 1, params, True))
    assert response.prompt_logprobs == [None, -2.0, -3.0]
    assert response.sequences[0].tokens == [8, 9]
    assert response.sequences[0].logprobs == [logprob_of(0) - 0.5, logprob_of(1) - 0.5]
    assert _bodies(serving)[0]["echo"] is True
    with pytest.raises(NotImplementedError, match="top-k"):
        run(client.sample_async(types.ModelInput.from_ints(PROMPT), 1, params, False, 5))
