"""Continuous batching: many sequences decoded together, joining and leaving between steps.

`BatchDecoder` keeps one KV cache for every running sequence, left-padded to a common length
with a padding mask. New sequences are prefilled together (right-padded, which leaves every real
position's values unchanged in a causal model), their caches are cut to their real lengths and
merged into the running batch by left padding; each decode step then feeds every sequence its
last token at its own position id. Padded keys are masked out of attention, so a sequence's
logits equal an unbatched forward up to fp32 summation order (~1e-6), and logprobs are the
trainer's fp32 log-softmax (`sampling.py`). Finished sequences leave at once and all-padding
columns are trimmed, so the batch never pays for what left it.

Why true continuous batching rather than an admission window: under a closed-loop load (a client
sends its next request when the last one ends) requests arrive spread out, and a window would
either hold them back or run half-empty batches; merging caches costs one copy per admission.

The decoder is single-threaded and synchronous; `loop.py` drives it from a serving thread, and
the trainer's tinker sampler runs it to completion on its worker (`run_to_completion`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from backend.serving.sampling import Draw, SamplingParams, draw_tokens, top_logprobs

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class SequenceTooLongError(ValueError):
    """A sequence asks for more tokens than the decoder holds per sequence (a bad request)."""


@dataclass(frozen=True)
class DecodingModel:
    """A causal LM ready to decode, with what stopping and text need."""

    module: torch.nn.Module
    device: torch.device
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int]
    cache_kwarg: str  # `cache` (transformers 5) or `past_key_values` (4.x)
    decode: Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class SequenceSpec:
    """What one sequence asks for. `max_tokens` must fit the context (callers clip it)."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    seed: int
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    prompt_logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its raw logprob; `sampling_logprob` is None for prompt positions."""

    token_id: int
    logprob: float
    sampling_logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class DecodingSequence:
    """One sequence's progress. The decoder appends to it; its owner reads it."""

    spec: SequenceSpec
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Positions 1..P-1 of the prompt (position 0 has no logprob), when asked for.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.spec.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def next_position(self) -> int:
        """Position id of the last sampled token, the next one fed to the model."""
        return len(self.spec.prompt) + len(self.tokens) - 1


class BatchDecoder:
    """The running batch of one model: admit sequences, step, and let finished ones go."""

    def __init__(self, model: DecodingModel) -> None:
        self.model = model
        self.active: list[DecodingSequence] = []
        self._cache: DynamicCache | None = None
        self._mask_BL: torch.Tensor | None = None  # 1 = real token, 0 = left padding

    def admit(self, sequences: Sequence[DecodingSequence]) -> None:
        """Prefill `sequences` together, draw their first tokens and add the unfinished ones."""
        if not sequences:
            return
        for sequence in sequences:
            self.check_fits(sequence.spec)
        lengths = [len(s.spec.prompt) for s in sequences]
        with torch.no_grad(), _autocast(self.model.device):
            logits_BV, kv = self._prefill(sequences, lengths)
        generating = [b for b, s in enumerate(sequences) if s.spec.max_tokens > 0]
        for sequence in sequences:
            if sequence.spec.max_tokens == 0:
                sequence.finish_reason = "length"  # a scoring request: prompt logprobs only
        if generating:
            self._append_draws([sequences[b] for b in generating], logits_BV[generating])
        joining = [b for b in generating if not sequences[b].done]
        if joining:
            self._merge([sequences[b] for b in joining], kv, [lengths[b] for b in joining], joining)

    @property
    def sequence_limit(self) -> int | None:
        """Prompt plus generated tokens one sequence may hold; None: only the context bounds it."""
        return None

    def check_fits(self, spec: SequenceSpec) -> None:
        """`SequenceTooLongError` when `spec` cannot fit this decoder's per-sequence limit."""
        limit = self.sequence_limit
        if limit is not None and len(spec.prompt) + spec.max_tokens > limit:
            raise SequenceTooLongError(
                f"prompt ({len(spec.prompt)} tokens) + max_tokens ({spec.max_tokens}) exceed the "
                f"static KV cache of {limit} tokens per sequence (serving engine setting "
                "static_max_len)"
            )

    def serve(self, model: DecodingModel) -> None:
        """Decode with `model` from now on (a weight swap: same architecture, empty batch;
        cancelled sequences that have not left yet leave now)."""
        self._drop_done()
        if self.active:
            raise RuntimeError("a decoder changes weights only with an empty batch")
        self.model = model

    def step(self) -> None:
        """Feed every running sequence its last token and draw the next one."""
        self._drop_done()
        if not self.active:
            return
        with torch.no_grad(), _autocast(self.model.device):
            logits_BV = self._decode_logits()
        self._append_draws(self.active, logits_BV)
        self._drop_done()

    def _decode_logits(self) -> torch.Tensor:
        """One decode forward over the running batch: fp32 logits [B, V], row b = active[b]."""
        assert self._cache is not None and self._mask_BL is not None
        device = self.model.device
        tokens_B1 = torch.tensor([[s.tokens[-1]] for s in self.active], device=device)
        positions_B1 = torch.tensor([[s.next_position] for s in self.active], device=device)
        ones_B1 = torch.ones(len(self.active), 1, dtype=self._mask_BL.dtype, device=device)
        mask_BL = torch.cat([self._mask_BL, ones_B1], dim=1)
        out = self.model.module(
            input_ids=tokens_B1,
            position_ids=positions_B1,
            attention_mask=mask_BL,
            use_cache=True,
            **{self.model.cache_kwarg: self._cache},
        )
        self._mask_BL = mask_BL
        logits_BV: torch.Tensor = out.logits[:, -1].float()
        return logits_BV

    def cancel_all(self) -> list[DecodingSequence]:
        """Empty the batch (a swap or a shutdown); the sequences that were running."""
        running = [s for s in self.active if not s.done]
        self.active, self._cache, self._mask_BL = [], None, None
        return running

    # -- prefill and merge ----------------------------------------------------------------------

    def _prefill(
        self, sequences: Sequence[DecodingSequence], lengths: list[int]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits at each prompt's last position [B, V] and the per-layer prompt KV."""
        device = self.model.device
        longest = max(lengths)
        tokens_BT = torch.zeros(len(sequences), longest, dtype=torch.int64)
        mask_BT = torch.zeros(len(sequences), longest, dtype=torch.int64)
        for b, sequence in enumerate(sequences):
            tokens_BT[b, : lengths[b]] = torch.tensor(sequence.spec.prompt, dtype=torch.int64)
            mask_BT[b, : lengths[b]] = 1
        all_positions = any(s.spec.prompt_logprobs for s in sequences)
        last_B1 = torch.tensor([[n - 1] for n in lengths], device=device)
        keep: int | torch.Tensor = 0 if all_positions else last_B1
        cache = DynamicCache()
        out = self.model.module(
            input_ids=tokens_BT.to(device),
            # Without padding the model takes its plain causal path, like the trainer.
            attention_mask=None if min(lengths) == longest else mask_BT.to(device),
            use_cache=True,
            logits_to_keep=keep,
            **{self.model.cache_kwarg: cache},
        )
        logits_BKV = out.logits.float()
        if all_positions:
            self._record_prompt_logprobs(sequences, lengths, logits_BKV)
            logits_BV = logits_BKV.gather(
                1, last_B1.unsqueeze(-1).expand(-1, 1, logits_BKV.shape[-1])
            ).squeeze(1)
        else:
            logits_BV = logits_BKV[:, -1]
        kv = [(layer.keys, layer.values) for layer in _layers(cache)]
        return logits_BV, kv

    def _record_prompt_logprobs(
        self, sequences: Sequence[DecodingSequence], lengths: list[int], logits_BTV: torch.Tensor
    ) -> None:
        lp_BTV = torch.log_softmax(logits_BTV, dim=-1)
        for b, sequence in enumerate(sequences):
            if not sequence.spec.prompt_logprobs:
                continue
            prompt = sequence.spec.prompt
            n = lengths[b]
            targets = torch.tensor(prompt[1:n], dtype=torch.int64, device=lp_BTV.device)
            values = lp_BTV[b, : n - 1].gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            k = sequence.spec.top_logprobs
            tops = [tuple(top_logprobs(lp_BTV[b, t], k)) for t in range(n - 1)] if k else None
            sequence.prompt_logprobs = [
                TokenLogprob(token, value, None, tops[t] if tops else ())
                for t, (token, value) in enumerate(zip(prompt[1:n], values, strict=True))
            ]

    def _merge(
        self,
        sequences: list[DecodingSequence],
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        lengths: list[int],
        rows: list[int],
    ) -> None:
        """Add prefilled sequences to the batch: everything left-padded to one length."""
        old_length = 0 if self._mask_BL is None else self._mask_BL.shape[1]
        length = max(old_length, *lengths)
        device = self.model.device
        row_index = torch.tensor(rows, device=device)
        new_mask_BL = torch.zeros(len(rows), length, dtype=torch.int64, device=device)
        for j, n in enumerate(lengths):
            new_mask_BL[j, length - n :] = 1
        merged: list[tuple[torch.Tensor, torch.Tensor]] = []
        old_layers = [] if self._cache is None else list(_layers(self._cache))
        for index, (keys, values) in enumerate(kv):
            new_keys = _left_aligned(keys.index_select(0, row_index), lengths, length)
            new_values = _left_aligned(values.index_select(0, row_index), lengths, length)
            if old_layers:
                old = old_layers[index]
                new_keys = torch.cat([_left_pad(old.keys, length), new_keys], dim=0)
                new_values = torch.cat([_left_pad(old.values, length), new_values], dim=0)
            merged.append((new_keys, new_values))
        if self._mask_BL is not None:
            new_mask_BL = torch.cat([_left_pad(self._mask_BL, length), new_mask_BL], dim=0)
        self._cache = DynamicCache(ddp_cache_data=merged)
        self._mask_BL = new_mask_BL
        self.active.extend(sequences)

    # -- drawing and leaving ------------------------------------------------------------------

    def _append_draws(self, sequences: Sequence[DecodingSequence], logits_BV: torch.Tensor) -> None:
        draws = draw_tokens(
            logits_BV, [s.spec.sampling for s in sequences], [s.generator for s in sequences]
        )
        wants_top = [b for b, s in enumerate(sequences) if s.spec.top_logprobs > 0]
        tops: dict[int, tuple[tuple[int, float], ...]] = {}
        if wants_top:
            lp_BV = torch.log_softmax(logits_BV, dim=-1)
            for b in wants_top:
                tops[b] = tuple(top_logprobs(lp_BV[b], sequences[b].spec.top_logprobs))
        for b, (sequence, drawn) in enumerate(zip(sequences, draws, strict=True)):
            self._append(sequence, drawn, tops.get(b, ()))

    def _append(
        self, sequence: DecodingSequence, drawn: Draw, top: tuple[tuple[int, float], ...]
    ) -> None:
        spec = sequence.spec
        sequence.tokens.append(drawn.token_id)
        sequence.logprobs.append(
            TokenLogprob(drawn.token_id, drawn.logprob, drawn.sampling_logprob, top)
        )
        if drawn.token_id in spec.stop_token_ids or _hit_stop_string(sequence, self.model):
            sequence.finish_reason = "stop"
        elif len(sequence.tokens) >= spec.max_tokens:
            sequence.finish_reason = "length"
        elif sequence.next_position + 1 >= self.model.context_length:
            sequence.finish_reason = "length"  # the next token would not fit the context

    def _drop_done(self) -> None:
        keep = [b for b, s in enumerate(self.active) if not s.done]
        if len(keep) == len(self.active):
            return
        if not keep:
            self.cancel_all()
            return
        assert self._cache is not None and self._mask_BL is not None
        index = torch.tensor(keep, device=self.model.device)
        mask_BL = self._mask_BL.index_select(0, index)
        # Columns that are padding in every remaining row carry nothing: trim them.
        first = int(torch.argmax(mask_BL.any(dim=0).to(torch.int8)))
        for layer in _layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._mask_BL = mask_BL[:, first:]
        self.active = [self.active[b] for b in keep]


def run_to_completion(model: DecodingModel, sequences: Sequence[DecodingSequence]) -> None:
    """Decode `sequences` as one batch until all finish (the caller's thread)."""
    decoder = BatchDecoder(model)
    decoder.admit(sequences)
    while decoder.active:
        decoder.step()


def _hit_stop_string(sequence: DecodingSequence, model: DecodingModel) -> bool:
    """Whether the text now contains a stop string. Checked after every token, so a first
    match ends at the newest token: decoding a tail that holds the longest stop string is
    enough (a character is at most 4 byte-tokens), which keeps each check O(1)."""
    stops = sequence.spec.stop_strings
    if not stops:
        return False
    window = 4 * max(len(stop) for stop in stops) + 4
    text = model.decode(sequence.tokens[-window:])
    return any(stop in text for stop in stops)


def _autocast(device: torch.device) -> AbstractContextManager[object]:
    # The trainer's default numerics (its engine plan's `autocast`): bf16 matmuls on GPU,
    # plain fp32 on CPU, so a hotloaded policy samples as it was trained.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _layers(cache: DynamicCache) -> Iterable[Any]:
    # `DynamicCache.layers` holds one `DynamicLayer` per decoder layer (keys/values [B,H,L,D]).
    layers: list[Any] = cache.layers
    return layers


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dimension 2 (KV) or 1 (mask) on the left with zeros up to `length`."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _left_aligned(kv_BHTD: torch.Tensor, lengths: list[int], length: int) -> torch.Tensor:
    """Right-padded prefill KV rows → rows of `length` with the real entries at the end."""
    batch, heads, _, dim = kv_BHTD.shape
    out = kv_BHTD.new_zeros(batch, heads, length, dim)
    for b, n in enumerate(lengths):
        out[b, :, length - n :] = kv_BHTD[b, :, :n]
    return out
