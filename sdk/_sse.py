"""Parse a buffered completions stream (Server-Sent Events) and turn it into a sample.

Two steps, kept apart so each is testable on plain strings: `parse_stream` assembles the chunks
into one `CompletionResult` (with the `snapshot_identity` of the weights that generated it,
when the server sends one) and says whether the stream was cut off (a truncation is retried);
`to_completion` applies the sampler's rules (mandatory `raw_output`, echo stripping, logprob
fallbacks, `max_seq_len`) and yields a `SampledCompletion`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sdk.errors import FireworksError
from sdk.sampling_types import (
    CompletionChoice,
    CompletionResult,
    LogprobEntry,
    RawOutput,
    SampledCompletion,
)

__all__ = ["ParsedStream", "parse_stream", "to_completion"]

logger = logging.getLogger(__name__)

_DONE = "[DONE]"


@dataclass
class _ChoiceAccumulator:
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    raw_output: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None

    def add(self, choice: dict[str, Any]) -> None:
        self.text.append(choice.get("text") or "")
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs.extend(logprobs["content"])
        # The last non-empty value wins: the final chunk carries these.
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.raw_output = choice.get("raw_output") or self.raw_output
        self.prompt_token_ids = choice.get("prompt_token_ids") or self.prompt_token_ids


@dataclass(frozen=True)
class ParsedStream:
    """The assembled result, and whether the stream ended as a complete one must."""

    result: CompletionResult
    saw_done: bool
    truncated: bool


def _events(body: str) -> Iterator[str]:
    """The data of each event: `data:` lines joined, comments and other fields skipped."""
    data: list[str] = []
    for line in body.splitlines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:  # a last event without its blank line
        yield "\n".join(data)


def parse_stream(body: str) -> ParsedStream:
    """Assemble the chunks of an SSE body (or of a plain JSON completion) into one result.

    A stream with no `[DONE]`, no `finish_reason` and no `raw_output` was cut off: `truncated`.
    An unparseable event (a chunk cut in half) is skipped; truncation detection catches it.
    """
    stripped = body.lstrip()
    events = [stripped] if stripped.startswith("{") else list(_events(body))
    choices: dict[int, _ChoiceAccumulator] = {}
    usage: dict[str, int] | None = None
    perf: dict[str, Any] | None = None
    snapshot: str | None = None
    saw_done = stripped.startswith("{")
    for event in events:
        if event.strip() == _DONE:
            saw_done = True
            continue
        try:
            chunk = json.loads(event)
        except ValueError:
            logger.debug("skipping an unparseable SSE event (%d chars)", len(event))
            continue
        if not isinstance(chunk, dict):
            continue
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                choices.setdefault(int(choice.get("index") or 0), _ChoiceAccumulator()).add(choice)
        usage = chunk.get("usage") or usage
        perf = chunk.get("perf_metrics") or perf
        snapshot = _snapshot_identity(chunk) or snapshot
    finished = any(c.finish_reason or c.raw_output for c in choices.values())
    result = _assemble(choices, usage, perf, snapshot)
    return ParsedStream(result=result, saw_done=saw_done, truncated=not (saw_done or finished))


def _snapshot_identity(chunk: dict[str, Any]) -> str | None:
    """The chunk's `snapshot_identity`, if it is a non-empty string (a server that sends none,
    or something else under that name, leaves the sample's identity unknown, never fails it)."""
    value = chunk.get("snapshot_identity")
    return value if isinstance(value, str) and value else None


def _assemble(
    choices: dict[int, _ChoiceAccumulator],
    usage: dict[str, int] | None,
    perf: dict[str, Any] | None,
    snapshot: str | None,
) -> CompletionResult:
    try:
        return CompletionResult(
            choices=[
                CompletionChoice(
                    index=index,
                    text="".join(acc.text),
                    finish_reason=acc.finish_reason or "stop",
                    logprobs=[LogprobEntry.model_validate(e) for e in acc.logprobs],
                    raw_output=RawOutput.model_validate(acc.raw_output) if acc.raw_output else None,
                    prompt_token_ids=acc.prompt_token_ids,
                )
                for index, acc in sorted(choices.items())
            ],
            usage=usage,
            perf_metrics=perf,
            snapshot_identity=snapshot,
        )
    except ValidationError as exc:
        raise FireworksError(f"malformed completions stream from the deployment: {exc}") from None


def to_completion(
    result: CompletionResult,
    *,
    sent_prompt: Sequence[int],
    echo: bool,
    logprobs_requested: bool,
    full_distribution: bool,
    max_seq_len: int | None,
) -> SampledCompletion | None:
    """The first choice as a `SampledCompletion`; None when it exceeds `max_seq_len`.

    Raises `FireworksError` when the server broke the contract (no `raw_output` completion ids;
    an echo that does not start with the prompt).
    """
    if not result.choices:
        raise FireworksError("the deployment's completion has no choices")
    choice = result.choices[0]
    raw = choice.raw_output
    if raw is None or raw.completion_token_ids is None:
        raise FireworksError(
            "the deployment's completion has no raw_output.completion_token_ids; "
            "the sampler needs token ids (send raw_output: true)"
        )
    prompt = list(choice.prompt_token_ids or raw.prompt_token_ids or sent_prompt)
    completion = list(raw.completion_token_ids)
    entries = list(choice.logprobs)
    if echo:
        # The server prepended the prompt: strip it from the ids, and drop the first logprob
        # (the first prompt token has nothing before it; servers send a placeholder number or
        # null there) so the rest aligns with full_tokens[1:].
        if completion[: len(prompt)] != prompt:
            raise FireworksError("echoed completion_token_ids do not start with the prompt")
        completion = completion[len(prompt) :]
        entries = entries[1:]
    full_tokens = prompt + completion
    if max_seq_len is not None and len(full_tokens) > max_seq_len:
        logger.info("dropping a completion of %d tokens > max_seq_len", len(full_tokens))
        return None
    inference, sampling = _logprobs(entries, logprobs_requested, full_distribution)
    routing = [e.routing_matrix for e in entries]
    return SampledCompletion(
        text=choice.text,
        full_tokens=full_tokens,
        prompt_len=len(prompt),
        finish_reason=choice.finish_reason,
        completion_len=len(completion),
        inference_logprobs=inference,
        sampling_logprobs=sampling,
        logprobs_echoed=echo,
        routing_matrices=routing if any(r is not None for r in routing) else None,
        snapshot_identity=result.snapshot_identity,
    )


_warned_raw_fallback = False


def _logprobs(
    entries: Sequence[LogprobEntry], requested: bool, full_distribution: bool
) -> tuple[list[float] | None, list[float | None] | None]:
    """(inference, sampling) logprobs: inference None if any is missing; sampling per entry,
    falling back to the raw values when the server sent none and nothing reshaped the
    distribution (T=1, top_p=1, top_k=0), where the two are the same numbers."""
    global _warned_raw_fallback
    if not requested:
        return None, None
    raw = [e.logprob for e in entries]
    inference = None if any(v is None for v in raw) else [float(v) for v in raw if v is not None]
    sampling: list[float | None] = [e.sampling_logprob for e in entries]
    if entries and all(v is None for v in sampling) and full_distribution and inference:
        if not _warned_raw_fallback:
            logger.warning("no sampling_logprob from the server; using the raw logprobs (T=1)")
            _warned_raw_fallback = True
        sampling = list(inference)
    return inference, sampling
