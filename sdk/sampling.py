"""`DeploymentSampler`: token-in, token-out sampling from a deployment.

The client tokenizes (so the ids a loss sees are the ids the server sampled), sends one
streaming completion per sample and keeps `raw_output` ids and both logprobs. One logical
completion is retried as a unit: transient failures back off, a deployment that is
hotloading (404/425) is waited out, and every attempt carries the same `x-request-id`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import httpx

from sdk._http import AsyncHttpClient
from sdk._sampling_retry import AsyncSleep, LogicalRequest, SamplerRetryPolicy
from sdk._sse import to_completion
from sdk.concurrency import (
    AdaptiveConcurrencyController,
    ConcurrencyController,
    FixedConcurrencyController,
)
from sdk.errors import ConfigError
from sdk.sampling_types import CompletionResult, SampledCompletion, ServerMetrics, Tokenizer
from sdk.settings import resolve_api_key

__all__ = ["REQUEST_CONTEXT_KEYS", "DeploymentSampler", "SamplerRetryPolicy"]

logger = logging.getLogger(__name__)

REQUEST_CONTEXT_KEYS = ("session", "run", "checkpoint", "step", "group", "item")
_DEFAULT_HTTP_TIMEOUT_S = 600.0


def _prompt_ids(encoded: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` answers a list (transformers 4) or a dict-like
    `BatchEncoding` (transformers 5): the ids either way."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    ids = list(encoded)
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(token) for token in ids]


class DeploymentSampler:
    """Samples completions of token-id prompts from `model` (`accounts/<a>/deployments/<d>`).

    `tokenizer` (a tokenizer, or a name/path loaded lazily with transformers) is needed for
    chat messages and integer stop tokens. Without a controller the window is adaptive
    (initially 16); `max_concurrency` is the deprecated spelling of a fixed one.
    `request_context` (session, run, checkpoint, step, group, item) is attached to errors.
    """

    def __init__(
        self,
        inference_url: str,
        model: str,
        api_key: str | None,
        tokenizer: Tokenizer | str | None = None,
        concurrency_controller: ConcurrencyController | None = None,
        max_concurrency: int | None = None,
        additional_headers: Mapping[str, str] | None = None,
        *,
        request_context: Mapping[str, str | int] | None = None,
        retry_policy: SamplerRetryPolicy | None = None,
        verify_ssl: bool | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        sleep: AsyncSleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not model:
            raise ConfigError("model must name a deployment: accounts/<a>/deployments/<d>")
        if max_concurrency is not None:
            if concurrency_controller is not None:
                raise ConfigError("pass concurrency_controller or max_concurrency, not both")
            warnings.warn(
                "max_concurrency is deprecated; pass FixedConcurrencyController(n)",
                DeprecationWarning,
                stacklevel=2,
            )
            concurrency_controller = FixedConcurrencyController(max_concurrency)
        self.model = model
        self.concurrency_controller = concurrency_controller or AdaptiveConcurrencyController()
        self.request_context = {
            key: value
            for key, value in (request_context or {}).items()
            if key in REQUEST_CONTEXT_KEYS
        }
        self.retry_policy = retry_policy or SamplerRetryPolicy()
        self._tokenizer = tokenizer
        self._http = AsyncHttpClient(
            resolve_api_key(api_key),
            inference_url,
            additional_headers=additional_headers,
            verify_ssl=verify_ssl,
            transport=transport,
            http_client=http_client,
        )
        self._sleep = sleep
        self._rng = rng
        self._metrics: list[ServerMetrics] = []

    def __repr__(self) -> str:
        return f"DeploymentSampler(model={self.model!r}, inference_url={self._http.base_url!r})"

    @property
    def inference_url(self) -> str:
        """Where completions are sent (without the path)."""
        return self._http.base_url

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer, loaded on first use when given by name."""
        if isinstance(self._tokenizer, str):
            from transformers import AutoTokenizer  # lazy: `import sdk` stays light

            loaded = cast(Tokenizer, AutoTokenizer.from_pretrained(self._tokenizer))
            self._tokenizer = loaded
            return loaded
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer | str | None) -> None:
        self._tokenizer = tokenizer

    def _require_tokenizer(self, why: str) -> Tokenizer:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ConfigError(f"tokenizer: {why} needs a tokenizer; pass tokenizer= to the sampler")
        return tokenizer

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        await self._http.aclose()

    def drain_metrics(self) -> list[ServerMetrics]:
        """The metrics of every successful request since the last drain, then forget them."""
        drained, self._metrics = self._metrics, []
        return drained

    # -- sampling ----------------------------------------------------------------------------

    async def sample_with_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        **kw: Any,
    ) -> list[SampledCompletion]:
        """`n` samples continuing the chat `messages` (rendered with the generation prompt)."""
        tokenizer = self._require_tokenizer("sample_with_tokens")
        encoded = tokenizer.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=True
        )
        return await self.sample_with_prompt_tokens(
            _prompt_ids(encoded), n, max_tokens, temperature, max_seq_len, **kw
        )

    async def sample_with_prompt_tokens(
        self,
        prompt_token_ids: Sequence[int],
        n: int = 1,
        max_tokens: int = 1024,
        temperature: float = 1.0,
        max_seq_len: int | None = None,
        stop: str | Sequence[str] | Sequence[int] | None = None,
        **kw: Any,
    ) -> list[SampledCompletion]:
        """`n` independent samples of one tokenized prompt, sent concurrently; completions
        longer than `max_seq_len` in all are dropped (a prompt that fills it sends nothing)."""
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        prompt = [int(token) for token in prompt_token_ids]
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            logger.info("prompt of %d tokens leaves no room in max_seq_len", len(prompt))
            return []
        stop_strings = self._stop_strings(stop)
        if stop_strings:
            kw["stop"] = stop_strings
        samples = await _gather_or_cancel(
            [
                self._sample_one(prompt, max_tokens, temperature, max_seq_len, dict(kw))
                for _ in range(n)
            ]
        )
        return [sample for sample in samples if sample is not None]

    def _stop_strings(self, stop: str | Sequence[str] | Sequence[int] | None) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        items = list(stop)
        if all(isinstance(item, str) for item in items):
            return [str(item) for item in items]
        if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            tokenizer = self._require_tokenizer("stop given as token ids")
            return [tokenizer.decode([item], skip_special_tokens=False) for item in items]
        raise ConfigError("stop must be all strings or all token ids, not a mix")

    async def _sample_one(
        self,
        prompt: list[int],
        max_tokens: int,
        temperature: float,
        max_seq_len: int | None,
        kw: dict[str, Any],
    ) -> SampledCompletion | None:
        result, _ = await self.async_completions_stream(prompt, max_tokens, temperature, **kw)
        full_distribution = (
            temperature == 1.0 and kw.get("top_p", 1.0) == 1.0 and kw.get("top_k", 0) == 0
        )
        return to_completion(
            result,
            sent_prompt=prompt,
            echo=bool(kw.get("echo", False)),
            logprobs_requested=bool(kw.get("logprobs", True)),
            full_distribution=full_distribution,
            max_seq_len=max_seq_len,
        )

    async def async_completions_stream(
        self,
        prompt: Sequence[int],
        max_tokens: int = 1024,
        temperature: float = 1.0,
        hotload_retry_interval: float = 5.0,
        hotload_max_retries: int = 10,
        logical_request_id: str | None = None,
        **kw: Any,
    ) -> tuple[CompletionResult, ServerMetrics]:
        """One streaming completion, retried as a unit; the assembled result and the
        server's metrics for it. `http_timeout` (s) is the read timeout of each attempt."""
        http_timeout = float(kw.pop("http_timeout", _DEFAULT_HTTP_TIMEOUT_S))
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(prompt),
            "n": 1,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "perf_metrics_in_response": True,
            "raw_output": True,
            # Full-distribution sampling unless asked otherwise: on-policy RL must not inherit a
            # model's generation config (temperature, top-p, top-k); callers' kwargs still win.
            "top_p": 1.0,
            "top_k": 0,
            "logprobs": True,
        }
        if "images" in kw:
            body["return_token_ids"] = True
        body.update(kw)  # the caller's values win
        request = LogicalRequest(
            self._http,
            self.concurrency_controller,
            self.retry_policy,
            body,
            request_id=logical_request_id or uuid.uuid4().hex,
            timeout_s=http_timeout,
            context=self.request_context,
            sleep=self._sleep,
            rng=self._rng,
        )
        result, metrics = await request.run(hotload_retry_interval, hotload_max_retries)
        self._metrics.append(metrics)
        return result, metrics


async def _gather_or_cancel(
    coroutines: Sequence[Awaitable[SampledCompletion | None]],
) -> list[SampledCompletion | None]:
    """All results in order; on the first failure the siblings are cancelled, then it raises
    (`asyncio.gather` would leave them running and holding concurrency slots)."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
