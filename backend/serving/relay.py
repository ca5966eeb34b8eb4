"""One completion request on a replica: its sequences, and their progress relayed to the client.

`CompletionRun` checks the prompt against the served model (vocabulary, context), turns the
request into one `DecodingSequence` per choice, and bridges the generation thread to the event
loop: the thread's `deliver` callbacks are posted onto an asyncio queue, which `stream()` turns
into SSE chunks (then `data: [DONE]`) and `collect()` into one `text_completion` object. A
client that disconnects mid-stream cancels its sequences, which leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from backend.errors import ApiError
from backend.serving.completions import (
    ChoiceStream,
    CompletionEnvelope,
    CompletionRequest,
    JsonDict,
    perf_metrics,
    sse_event,
    usage,
)
from backend.serving.generation import DecodingModel, DecodingSequence, SequenceSpec
from backend.serving.loop import Progress, Submission, Timings
from backend.serving.sampling import SamplingParams
from backend.serving.weights import ModelFactory


class CompletionRun:
    """The sequences of one request and the relay of their progress."""

    def __init__(
        self,
        body: CompletionRequest,
        model: DecodingModel,
        factory: ModelFactory,
        event_loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._body = body
        max_tokens = _checked_max_tokens(body, model)
        stop_ids = model.eos_token_ids | body.stop_token_ids()
        sampling = SamplingParams(body.temperature, body.top_p, max(body.top_k, 0))
        specs = [
            SequenceSpec(
                prompt=tuple(body.prompt),
                max_tokens=max_tokens,
                sampling=sampling,
                seed=seed,
                stop_token_ids=stop_ids,
                stop_strings=body.stop_strings(),
                prompt_logprobs=body.echo and body.wants_logprobs,
                top_logprobs=body.top_count if body.wants_logprobs else 0,
            )
            for seed in body.choice_seeds()
        ]
        self.choices = [
            ChoiceStream(
                index,
                body,
                stop_token_ids=stop_ids,
                decode=factory.decode,
                token_text=factory.token_text,
            )
            for index in range(body.n)
        ]
        self._envelope = CompletionEnvelope(body.model)
        self._queue: asyncio.Queue[Progress] = asyncio.Queue()
        self._event_loop = event_loop
        self._started = [False] * body.n
        self._timings: Timings | None = None
        self.submission = Submission(
            [DecodingSequence(spec) for spec in specs], self._deliver, incremental=body.stream
        )

    async def stream(self, snapshot_identity: str | None = None) -> AsyncIterator[bytes]:
        """SSE: chunks as tokens come, the last with usage, perf_metrics and the snapshot
        identity of the weights that generated them (when they are a snapshot), then [DONE]."""
        finished = False
        try:
            while not finished:
                progress = await self._queue.get()
                if progress.error is not None:
                    # Ending without [DONE] or a finish reason: clients treat it as a
                    # truncated stream and retry. The comment says why to a human reader.
                    yield f": error: {progress.error}\n\n".encode()
                    return
                chunks = self._chunks(progress)
                finished = progress.done
                if finished:
                    chunks = chunks or [self._envelope.chunk([])]
                    chunks[-1].update(self._final_fields(snapshot_identity))
                for chunk in chunks:
                    yield sse_event(chunk)
            yield sse_event("[DONE]")
        finally:
            if not finished:
                self.submission.cancel()

    async def collect(self, snapshot_identity: str | None = None) -> JsonDict:
        """The non-streamed `text_completion` object."""
        merged: list[JsonDict] = [
            {"index": i, "text": "", "logprobs": None, "finish_reason": None}
            for i in range(self._body.n)
        ]
        while True:
            progress = await self._queue.get()
            if progress.error is not None:
                raise ApiError.unavailable(f"the completion failed: {progress.error}")
            for chunk in self._chunks(progress):
                for choice in chunk["choices"]:
                    _merge_choice(merged[choice["index"]], choice)
            if progress.done:
                return self._envelope.chunk(merged, **self._final_fields(snapshot_identity))

    def metric_headers(self) -> dict[str, str]:
        """`perf_metrics` as response headers too (clients read them as a fallback)."""
        if self._timings is None:
            return {}
        metrics = perf_metrics(self._timings, len(self._body.prompt))
        return {key: f"{value:g}" for key, value in metrics.items()}

    def _deliver(self, progress: Progress) -> None:
        # Called on the generation thread: hand over to the event loop, never touch it here.
        try:
            self._event_loop.call_soon_threadsafe(self._queue.put_nowait, progress)
        except RuntimeError:
            self.submission.cancel()  # the event loop is closed: nobody is listening

    def _chunks(self, progress: Progress) -> list[JsonDict]:
        if progress.timings is not None:
            self._timings = progress.timings
        chunks = []
        for update in progress.updates:
            choice = self.choices[update.index]
            if not self._started[update.index]:
                self._started[update.index] = True
                prologue = choice.prologue(update.prompt_logprobs or [])
                if prologue is not None:
                    chunks.append(self._envelope.chunk([prologue]))
            chunks.append(self._envelope.chunk([choice.advance(update)]))
        return chunks

    def _final_fields(self, snapshot_identity: str | None) -> JsonDict:
        prompt_tokens = len(self._body.prompt)
        fields: JsonDict = {"usage": usage(prompt_tokens, self.choices)}
        if self._timings is not None:
            fields["perf_metrics"] = perf_metrics(self._timings, prompt_tokens)
        if snapshot_identity:
            fields["snapshot_identity"] = snapshot_identity
        return fields


def _checked_max_tokens(body: CompletionRequest, model: DecodingModel) -> int:
    """The prompt must be token ids of this vocabulary with room left in the context;
    `max_tokens` is clipped to that room (fireloop choice: `length`, not a 400)."""
    prompt = body.prompt
    if not prompt:
        raise ApiError.invalid_argument("prompt: must contain at least one token id")
    for position, token in enumerate(prompt):
        if not 0 <= token < model.vocab_size:
            raise ApiError.invalid_argument(
                f"prompt[{position}]: token id {token} is outside the vocabulary "
                f"[0, {model.vocab_size})"
            )
    room = model.context_length - len(prompt)
    if room < (1 if body.max_tokens > 0 else 0):
        raise ApiError.invalid_argument(
            f"prompt: {len(prompt)} tokens leave no room in the model's context of "
            f"{model.context_length} tokens"
        )
    return min(body.max_tokens, room)


def _merge_choice(merged: JsonDict, choice: JsonDict) -> None:
    merged["text"] += choice["text"]
    if choice["logprobs"] is not None:
        content = merged["logprobs"]["content"] if merged["logprobs"] else []
        merged["logprobs"] = {"content": content + choice["logprobs"]["content"]}
    if choice["finish_reason"] is not None:
        merged["finish_reason"] = choice["finish_reason"]
    if "raw_output" in choice:
        merged["raw_output"] = choice["raw_output"]
