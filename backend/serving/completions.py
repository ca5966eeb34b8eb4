"""The completions wire: requests, choices, SSE chunks.

The local server is token-in: `prompt` is a list of token ids (a string prompt is a 400 naming
the field). Each choice is one decoded sequence; `ChoiceStream` turns its progress into text
deltas and `logprobs.content` entries. Text never shows a stop sequence: the terminating stop
token (EOS or a stop id) is left out and the text is cut before a stop string, while
`raw_output.completion_token_ids` keeps every generated token, stop tokens included (fireloop
choice). While streaming, text that could still turn out to begin a stop string, or
an incomplete UTF-8 character, is held back until the next tokens decide it.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

if TYPE_CHECKING:  # the generation side imports torch; this wire module never needs it
    from backend.serving.generation import TokenLogprob
    from backend.serving.loop import SequenceUpdate, Timings

JsonDict = dict[str, Any]
_SEED_MASK = (1 << 63) - 1


class CompletionRequest(BaseModel):
    """The body of `POST /inference/v1/completions`. Unknown fields are refused, so a misspelt
    option is never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    prompt: list[StrictInt]
    n: int = Field(default=1, ge=1, le=64)
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    # 0 (and tinker's -1) disable top-k.
    top_k: int = Field(default=0, ge=-1)
    stop: str | list[str | StrictInt] | None = None
    seed: StrictInt | None = None
    echo: bool = False
    logprobs: bool | StrictInt | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    # Accepted for compatibility; the local server always sends what they ask for.
    perf_metrics_in_response: bool = False
    raw_output: bool = False
    return_token_ids: bool = False
    # Dense local models have no expert routing: accepted, never returned.
    include_routing_matrix: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "the local server is token-in: send the prompt as a list of token ids, not text"
            )
        return value

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None and self.logprobs is not False

    @property
    def top_count(self) -> int:
        """How many top logprobs per position (OpenAI's integer `logprobs` also asks this)."""
        if self.top_logprobs is not None:
            return self.top_logprobs
        if isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool):
            return max(self.logprobs, 0)
        return 0

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if isinstance(s, str) and s)

    def stop_token_ids(self) -> frozenset[int]:
        stops = [] if isinstance(self.stop, str) else self.stop or []
        return frozenset(s for s in stops if isinstance(s, int))

    def choice_seeds(self) -> list[int]:
        """Choice i draws with seed + i, so choice 0 repeats a single-choice request."""
        base = self.seed if self.seed is not None else secrets.randbits(63)
        return [(base + i) & _SEED_MASK for i in range(self.n)]


class ChoiceStream:
    """One choice's text and logprob entries, built from its sequence's updates."""

    def __init__(
        self,
        index: int,
        request: CompletionRequest,
        *,
        stop_token_ids: frozenset[int],
        decode: Callable[[Sequence[int]], str],
        token_text: Callable[[int], str],
    ) -> None:
        self.index = index
        self._request = request
        self._stop_ids = stop_token_ids
        self._stop_strings = request.stop_strings()
        self._decode = decode
        self._token_text = token_text
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._emitted = ""

    def prologue(self, prompt_logprobs: Sequence[TokenLogprob]) -> JsonDict | None:
        """With `echo`: the prompt's text and logprob entries, sent before any token."""
        if not self._request.echo:
            return None
        prompt = self._request.prompt
        entries: list[JsonDict] = []
        if self._request.wants_logprobs:
            # The first prompt token has no context to be predicted from; it still carries a
            # number (0.0), because the published SDK drops the whole list when any entry is null
            # (it strips this row itself, as ours does).
            entries.append(self._entry(prompt[0], 0.0, None, ()))
            entries += [self._entry(p.token_id, p.logprob, None, p.top) for p in prompt_logprobs]
        return self._choice(self._decode(prompt), entries, None)

    def advance(self, update: SequenceUpdate) -> JsonDict:
        """The choice's chunk for `update` (text delta, entries, and finish reason if done)."""
        self.token_ids += [t.token_id for t in update.tokens]
        self.finish_reason = update.finish_reason
        entries = []
        if self._request.wants_logprobs:
            entries = [
                self._entry(t.token_id, t.logprob, t.sampling_logprob, t.top) for t in update.tokens
            ]
        text = self._text(final=self.finish_reason is not None)
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted += delta
        choice = self._choice(delta, entries, self.finish_reason)
        if self.finish_reason is not None:
            choice["raw_output"] = self.raw_output()
        return choice

    def raw_output(self) -> JsonDict:
        prompt = list(self._request.prompt)
        completion = prompt + self.token_ids if self._request.echo else list(self.token_ids)
        return {"prompt_token_ids": prompt, "completion_token_ids": completion}

    def _text(self, *, final: bool) -> str:
        visible = self.token_ids
        if self.finish_reason == "stop" and visible and visible[-1] in self._stop_ids:
            visible = visible[:-1]
        text = self._decode(visible) if visible else ""
        cut = min((i for s in self._stop_strings if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            return text[:cut]
        return text if final else text[: len(text) - self._held_back(text)]

    def _held_back(self, text: str) -> int:
        """Characters at the end that later tokens may still change or turn into a stop."""
        held = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character
        for stop in self._stop_strings:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    held = max(held, size)
                    break
        return held

    def _entry(
        self,
        token_id: int,
        logprob: float | None,
        sampling_logprob: float | None,
        top: Sequence[tuple[int, float]],
    ) -> JsonDict:
        entry: JsonDict = {
            "token": self._token_text(token_id),
            "token_id": token_id,
            "logprob": logprob,
            "sampling_logprob": sampling_logprob,
        }
        if self._request.top_count:
            entry["top_logprobs"] = [
                {"token": self._token_text(t), "token_id": t, "logprob": lp} for t, lp in top
            ]
        return entry

    def _choice(self, text: str, entries: list[JsonDict], finish: str | None) -> JsonDict:
        choice: JsonDict = {"index": self.index, "text": text, "finish_reason": finish}
        choice["logprobs"] = {"content": entries} if self._request.wants_logprobs else None
        return choice


class CompletionEnvelope:
    """The fields every chunk (or the one response object) shares, and the final extras."""

    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def chunk(self, choices: list[JsonDict], **extra: Any) -> JsonDict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def usage(prompt_tokens: int, choices: Sequence[ChoiceStream]) -> JsonDict:
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


PerfKey = Literal[
    "num-concurrent-requests",
    "prefill-queue-duration",
    "generation-queue-duration",
    "server-time-to-first-token",
    "cached-prompt-tokens",
    "prompt-tokens",
    "server-processing-time",
]


def perf_metrics(timings: Timings, prompt_tokens: int) -> dict[PerfKey, float]:
    """The server metrics of a completion, in seconds. Sequences join the decode batch right
    after their prefill, so the generation queue is always empty; there is no prompt cache."""
    return {
        "num-concurrent-requests": float(timings.batch_size),
        "prefill-queue-duration": timings.admitted - timings.submitted,
        "generation-queue-duration": 0.0,
        "server-time-to-first-token": timings.first_token - timings.submitted,
        "cached-prompt-tokens": 0.0,
        "prompt-tokens": float(prompt_tokens),
        "server-processing-time": timings.finished - timings.submitted,
    }


def sse_event(payload: JsonDict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
