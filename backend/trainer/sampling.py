"""Token sampling for stock tinker clients, from a sampler snapshot or the job's base model.

Firetitan clients sample through deployments; the trainer samples only so that unmodified
tinker clients (and parity tests) work against the local platform.
Decoding is the deployments' own batched decoder (`backend.serving.generation`), run to
completion on the job's worker, so both paths draw tokens and compute logprobs the same way:
the trainer's fp32 log-softmax, so at temperature 1 without top-k/top-p a sampled token's
logprob equals the trainer's `forward` logprob of it at the same weights.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel

from backend.models.loading import model_construction
from backend.serving.generation import (
    DecodingModel,
    DecodingSequence,
    SequenceSpec,
    run_to_completion,
)
from backend.serving.sampling import SamplingParams
from backend.trainer import export
from backend.trainer.atomic import MARKER_NAME
from backend.trainer.errors import UserError
from backend.trainer.modeling import load_hf_model
from backend.trainer.samplers import SamplerInfo
from backend.trainer.wire import (
    SampledSequenceWire,
    SampleRequest,
    SampleResult,
    SamplingParamsWire,
)

logger = logging.getLogger(__name__)

_CACHED_MODELS = 2  # loaded sampler models kept per job (base + the latest snapshot)
_SEED_MASK = (1 << 63) - 1


@dataclass
class SamplerModel:
    """A causal LM ready to sample, with what stopping needs."""

    model: torch.nn.Module
    model_dir: Path
    device: torch.device
    vocab_size: int
    eos_token_ids: frozenset[int]
    cache_kwarg: str  # `cache` (transformers 5) or `past_key_values` (4.x)
    tokenizer: Any = None  # loaded on the first request with stop strings

    def decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return cast(str, self.tokenizer.decode(list(tokens)))

    def decoding_model(self, context_length: int) -> DecodingModel:
        """This model as the serving decoder takes it."""
        return DecodingModel(
            module=self.model,
            device=self.device,
            vocab_size=self.vocab_size,
            context_length=context_length,
            eos_token_ids=self.eos_token_ids,
            cache_kwarg=self.cache_kwarg,
            decode=self.decode,
        )


class SamplerCache:
    """The most recently used sampler models of one job, loaded on demand."""

    def __init__(self, model_dir: Path, device: str) -> None:
        self._model_dir = model_dir
        self._device = torch.device(device)
        self._models: OrderedDict[tuple[Path, int] | None, SamplerModel] = OrderedDict()

    def get(self, info: SamplerInfo) -> SamplerModel:
        # A snapshot saved again under its name (allowed for sampler snapshots) has a new
        # completion marker: keyed by the marker's time too, it is loaded afresh.
        key = None
        if info.snapshot_dir is not None:
            marker = info.snapshot_dir / MARKER_NAME
            key = (info.snapshot_dir, marker.stat().st_mtime_ns if marker.is_file() else 0)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = _load(self._model_dir, info.snapshot_dir, self._device)
        self._models[key] = model
        while len(self._models) > _CACHED_MODELS:
            self._models.popitem(last=False)
        return model


def sample(sampler: SamplerModel, request: SampleRequest, context_length: int) -> SampleResult:
    """The tinker `SampleResponse` of one `asample` request.

    The samples decode as one batch on the serving side's decoder; sample i draws with seed + i.
    """
    prompt = _prompt_tokens(request, sampler.vocab_size)
    params = request.sampling_params
    budget = context_length - len(prompt)
    if budget < 1:
        raise UserError(
            f"prompt has {len(prompt)} tokens, no room in the context of {context_length}"
        )
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    stop_token_ids, stop_strings = _stop_conditions(sampler, params)
    top_k = request.topk_prompt_logprobs
    wants_prompt = bool(request.prompt_logprobs) or top_k > 0
    sequences = [
        DecodingSequence(
            SequenceSpec(
                prompt=tuple(prompt),
                max_tokens=min(params.max_tokens or budget, budget),
                sampling=SamplingParams(params.temperature, params.top_p, max(params.top_k, 0)),
                seed=(seed + index) & _SEED_MASK,
                stop_token_ids=stop_token_ids,
                stop_strings=stop_strings,
                # The prompt's logprobs are the same for every sample: computed once.
                prompt_logprobs=wants_prompt and index == 0,
                top_logprobs=top_k if index == 0 else 0,
            )
        )
        for index in range(request.num_samples)
    ]
    run_to_completion(sampler.decoding_model(context_length), sequences)
    scored = sequences[0].prompt_logprobs
    prompt_logprobs: list[float | None] | None = None
    topk: list[list[tuple[int, float]] | None] | None = None
    if request.prompt_logprobs:
        prompt_logprobs = [None] + [entry.logprob for entry in scored]
    if top_k > 0:
        topk = [None] + [[(token, value) for token, value in entry.top] for entry in scored]
    return SampleResult(
        sequences=[_sampled(s) for s in sequences],
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk,
    )


def _stop_conditions(
    sampler: SamplerModel, params: SamplingParamsWire
) -> tuple[frozenset[int], tuple[str, ...]]:
    """tinker's `stop`: None stops at EOS, [] never stops early, else the ids or strings."""
    stop = params.stop
    if stop is None:
        return sampler.eos_token_ids, ()
    stops: list[str | int] = [stop] if isinstance(stop, str) else list(stop)
    ids = frozenset(s for s in stops if isinstance(s, int))
    return ids, tuple(s for s in stops if isinstance(s, str))


def _sampled(sequence: DecodingSequence) -> SampledSequenceWire:
    return SampledSequenceWire(
        stop_reason=sequence.finish_reason or "length",
        tokens=list(sequence.tokens),
        # The logprob under the distribution sampled (tinker's sequence logprobs).
        logprobs=[entry.sampling_logprob for entry in sequence.logprobs],
    )


def _prompt_tokens(request: SampleRequest, vocab_size: int) -> list[int]:
    tokens: list[int] = []
    for index, chunk in enumerate(request.prompt.chunks):
        where = f"prompt.chunks[{index}]"
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise UserError(f"{where}: only encoded_text chunks are supported (text-only model)")
        chunk_tokens = chunk.get("tokens")
        if not isinstance(chunk_tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in chunk_tokens
        ):
            raise UserError(f"{where}.tokens must be a list of integers")
        tokens.extend(chunk_tokens)
    if not tokens:
        raise UserError("prompt has no tokens")
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        raise UserError(f"prompt tokens must be in [0, {vocab_size}) (vocab size)")
    return tokens


def _load(model_dir: Path, snapshot_dir: Path | None, device: torch.device) -> SamplerModel:
    """The base model, with a snapshot's weights (full, delta chain or LoRA adapter) applied."""
    model: torch.nn.Module = load_hf_model(model_dir, device)
    if snapshot_dir is not None:
        meta = export.read_snapshot_meta(snapshot_dir)
        if meta.get("format") == "peft_adapter":
            with model_construction():
                peft_model = PeftModel.from_pretrained(model, str(snapshot_dir))
            model = cast(torch.nn.Module, peft_model.merge_and_unload())
        else:
            tensors = export.load_snapshot_tensors(snapshot_dir)
            state = {name: t.to(device, torch.float32) for name, t in tensors.items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            untied = [name for name in missing if not name.startswith("lm_head.")]
            if untied or unexpected:
                raise UserError(f"snapshot {snapshot_dir} does not fit the base model: {untied}")
    model.eval()
    hf_model = cast(PreTrainedModel, model)
    eos = hf_model.generation_config.eos_token_id if hf_model.generation_config else None
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    logger.info("sampler loaded: %s", snapshot_dir or model_dir)
    return SamplerModel(
        model=model,
        model_dir=model_dir,
        device=device,
        vocab_size=int(hf_model.config.vocab_size),
        eos_token_ids=frozenset(int(e) for e in eos_ids),
        cache_kwarg="cache"
        if "cache" in inspect.signature(model.forward).parameters
        else ("past_key_values"),
    )
