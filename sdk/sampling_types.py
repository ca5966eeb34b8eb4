"""What the deployment sampler hands out: completions, per-request server metrics, and the
assembled streaming answer.

Frozen pydantic models, so results pickle into Prefect task results and can't be edited by
accident between the sampler and the loss. Nothing here depends on httpx, tinker or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

__all__ = [
    "PERF_METRIC_NAMES",
    "CompletionChoice",
    "CompletionResult",
    "LogprobEntry",
    "RawOutput",
    "SampledCompletion",
    "ServerMetrics",
    "Tokenizer",
]

# The server's names (in `perf_metrics` and as response headers) → ServerMetrics fields.
PERF_METRIC_NAMES: Mapping[str, str] = {
    "num-concurrent-requests": "num_concurrent_requests",
    "prefill-queue-duration": "prefill_queue_duration",
    "generation-queue-duration": "generation_queue_duration",
    "server-time-to-first-token": "server_time_to_first_token",
    "cached-prompt-tokens": "cached_prompt_tokens",
    "prompt-tokens": "prompt_tokens",
    "server-processing-time": "server_processing_time",
}


class Tokenizer(Protocol):
    """The two tokenizer methods the sampler uses (a transformers tokenizer has both)."""

    def apply_chat_template(self, conversation: Any, /, **kwargs: Any) -> Any: ...

    def decode(self, token_ids: Any, /, **kwargs: Any) -> str: ...


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ServerMetrics(_Frozen):
    """One successful request: the server's perf metrics (None when not reported) plus the
    client's view. The concurrency controllers feed on `prefill_queue_duration`."""

    num_concurrent_requests: float | None = None
    prefill_queue_duration: float | None = None
    generation_queue_duration: float | None = None
    server_time_to_first_token: float | None = None
    cached_prompt_tokens: float | None = None
    prompt_tokens: float | None = None
    server_processing_time: float | None = None
    client_latency_s: float | None = None
    attempts: int = 1

    @classmethod
    def from_response(
        cls,
        perf_metrics: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        *,
        client_latency_s: float,
        attempts: int,
    ) -> ServerMetrics:
        """The body's `perf_metrics`, each missing name read from the headers instead."""
        values: dict[str, float] = {}
        for wire_name, field in PERF_METRIC_NAMES.items():
            raw = (perf_metrics or {}).get(wire_name)
            if raw is None:
                raw = headers.get(wire_name)
            try:
                if raw is not None:
                    values[field] = float(raw)
            except (TypeError, ValueError):
                continue  # a malformed metric is dropped, never fatal to the sample
        return cls(**values, client_latency_s=client_latency_s, attempts=attempts)


class LogprobEntry(_Frozen):
    """One position of `choices[].logprobs.content`: `logprob` is the raw log-softmax at T=1,
    `sampling_logprob` the log-probability under the distribution actually sampled."""

    token: str | None = None
    token_id: int | None = None
    logprob: float | None = None
    sampling_logprob: float | None = None
    top_logprobs: Any = None
    routing_matrix: str | None = None


class RawOutput(_Frozen):
    """The token ids the server saw and produced (mandatory in the final chunk)."""

    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None


class CompletionChoice(_Frozen):
    """One choice assembled from all chunks of a stream."""

    index: int = 0
    text: str = ""
    finish_reason: str = "stop"
    logprobs: list[LogprobEntry] = []
    raw_output: RawOutput | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResult(_Frozen):
    """A whole streamed completion: its choices, `usage`, the server's `perf_metrics` and the
    `snapshot_identity` of the hotloaded weights that generated it (None when not sent)."""

    choices: list[CompletionChoice]
    usage: dict[str, int] | None = None
    perf_metrics: dict[str, Any] | None = None
    snapshot_identity: str | None = None


class SampledCompletion(_Frozen):
    """One sample, ready for a loss. `full_tokens` = prompt ids + completion ids.

    `inference_logprobs` (raw, T=1) and `sampling_logprobs` (behaviour policy) cover the
    completion, or with `logprobs_echoed` the P+C-1 positions after the first prompt token.
    `snapshot_identity` names the hotloaded snapshot whose weights generated every token; None
    when the server did not say (base weights, or a server that does not send it).
    """

    text: str
    full_tokens: list[int]
    prompt_len: int
    finish_reason: str = "unknown"
    completion_len: int = 0
    inference_logprobs: list[float] | None = None
    sampling_logprobs: list[float | None] | None = None
    logprobs_echoed: bool = False
    routing_matrices: list[str | None] | None = None
    snapshot_identity: str | None = None

    @property
    def completion_tokens(self) -> list[int]:
        """The generated token ids."""
        return self.full_tokens[self.prompt_len :]
