"""`FiretitanSamplingClient`: tinker's `sample` call shape over a `DeploymentSampler`.

Code written against tinker's `SamplingClient` (`sample(prompt, num_samples, sampling_params)`
→ a future of `SampleResponse`) runs unchanged against a deployment. The sampler's coroutines
run on one private event loop thread, so the futures are ordinary
`concurrent.futures.Future`s usable from synchronous code. Imports tinker: loaded lazily by
`sdk/__init__.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from types import TracebackType
from typing import Any, Self

from tinker import types

from sdk.errors import FireworksError
from sdk.sampling import DeploymentSampler
from sdk.sampling_types import SampledCompletion

__all__ = ["FiretitanSamplingClient"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024
_CLOSE_TIMEOUT_S = 10.0


class FiretitanSamplingClient:
    """Samples from a deployment with tinker's types: `ModelInput` in, `SampleResponse` out.

    Sequence logprobs are the server's `sampling_logprob` (the behaviour policy's); prompt
    logprobs (`include_prompt_logprobs`) are the raw ones, `None` first. Top-k prompt logprobs
    are not served by deployments.
    """

    def __init__(self, deployment_sampler: DeploymentSampler) -> None:
        self.deployment_sampler = deployment_sampler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FiretitanSamplingClient({self.deployment_sampler!r})"

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> concurrent.futures.Future[types.SampleResponse]:
        """`num_samples` continuations of `prompt`, as a future."""
        coroutine = self.sample_async(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs
        )
        return asyncio.run_coroutine_threadsafe(coroutine, self._running_loop())

    async def sample_async(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> types.SampleResponse:
        """`sample`, awaited on the caller's event loop."""
        if topk_prompt_logprobs > 0:
            raise NotImplementedError("top-k prompt logprobs are not served by deployments")
        prompt_ids = prompt.to_ints()
        samples = await self.deployment_sampler.sample_with_prompt_tokens(
            prompt_ids,
            n=num_samples,
            max_tokens=sampling_params.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=sampling_params.temperature,
            stop=sampling_params.stop,
            **_sampling_kwargs(sampling_params, include_prompt_logprobs),
        )
        sequences = [_sequence(sample) for sample in samples]
        prompt_logprobs = None
        if include_prompt_logprobs and samples:
            prompt_logprobs = _prompt_logprobs(samples[0], len(prompt_ids))
        return types.SampleResponse(sequences=sequences, _prompt_logprobs_list=prompt_logprobs)

    def close(self) -> None:
        """Stop the private event loop (the sampler's connections on it close first)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        closing = asyncio.run_coroutine_threadsafe(self.deployment_sampler.aclose(), loop)
        try:
            closing.result(timeout=_CLOSE_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_CLOSE_TIMEOUT_S)
            loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="firetitan-sampling", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop


def _sampling_kwargs(params: types.SamplingParams, echo: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"top_p": params.top_p, "logprobs": True}
    if params.top_k >= 0:  # tinker's -1 means "no limit": the sampler's default (0) already is
        kwargs["top_k"] = params.top_k
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if echo:
        kwargs["echo"] = True
    return kwargs


def _sequence(sample: SampledCompletion) -> types.SampledSequence:
    logprobs = list(sample.sampling_logprobs or [])
    if sample.logprobs_echoed:  # the echoed list covers P+C-1 positions: keep the last C
        logprobs = logprobs[len(logprobs) - sample.completion_len :]
    if len(logprobs) != sample.completion_len or any(value is None for value in logprobs):
        raise FireworksError(
            "the deployment returned no sampling_logprob for every generated token; "
            "tinker's SampledSequence needs them"
        )
    return types.SampledSequence(
        stop_reason="length" if sample.finish_reason == "length" else "stop",
        _tokens_list=sample.completion_tokens,
        _logprobs_list=[float(value) for value in logprobs if value is not None],
    )


def _prompt_logprobs(sample: SampledCompletion, prompt_len: int) -> list[float | None]:
    raw = sample.inference_logprobs
    if raw is None:
        raise FireworksError("the deployment returned no raw logprobs for the prompt")
    return [None, *raw[: prompt_len - 1]]
