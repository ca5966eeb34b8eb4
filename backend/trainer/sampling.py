"""Token sampling for stock tinker clients, from a sampler snapshot or the job's base model.

Firetitan clients sample through deployments; the trainer samples only so that unmodified
tinker clients (and parity tests) work against the local platform (tinker-protocol.md §13).
Logprobs use the trainer's fp32 log-softmax, so at temperature 1 without top-k/top-p a sampled
token's logprob equals the trainer's `forward` logprob of it at the same weights.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import AutoTokenizer, DynamicCache, PreTrainedModel

from backend.trainer import export
from backend.trainer.errors import UserError
from backend.trainer.modeling import load_hf_model
from backend.trainer.samplers import SamplerInfo
from backend.trainer.wire import JsonDict, SampleRequest, SamplingParamsWire

logger = logging.getLogger(__name__)

_CACHED_MODELS = 2  # loaded sampler models kept per job (base + the latest snapshot)


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

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return cast(str, self.tokenizer.decode(tokens))


class SamplerCache:
    """The most recently used sampler models of one job, loaded on demand."""

    def __init__(self, model_dir: Path, device: str) -> None:
        self._model_dir = model_dir
        self._device = torch.device(device)
        self._models: OrderedDict[Path | None, SamplerModel] = OrderedDict()

    def get(self, info: SamplerInfo) -> SamplerModel:
        key = info.snapshot_dir
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = _load(self._model_dir, info.snapshot_dir, self._device)
        self._models[key] = model
        while len(self._models) > _CACHED_MODELS:
            self._models.popitem(last=False)
        return model


def sample(sampler: SamplerModel, request: SampleRequest, context_length: int) -> JsonDict:
    """The tinker `SampleResponse` JSON for one `asample` request."""
    prompt = _prompt_tokens(request, sampler.vocab_size)
    params = request.sampling_params
    budget = context_length - len(prompt)
    if budget < 1:
        raise UserError(
            f"prompt has {len(prompt)} tokens, no room in the context of {context_length}"
        )
    max_tokens = min(params.max_tokens or budget, budget)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    prompt_logits_NV: torch.Tensor | None = None
    with torch.no_grad():
        for _ in range(request.num_samples):
            sequence, prompt_logits_NV = _generate(sampler, prompt, params, max_tokens, generator)
            sequences.append(sequence)
    assert prompt_logits_NV is not None
    answer: JsonDict = {"type": "sample", "sequences": sequences, "prompt_cache_hit_tokens": 0}
    lp_NV = torch.log_softmax(prompt_logits_NV, dim=-1)
    if request.prompt_logprobs:
        answer["prompt_logprobs"] = [None] + [
            float(lp_NV[t - 1, prompt[t]]) for t in range(1, len(prompt))
        ]
    if request.topk_prompt_logprobs > 0:
        k = min(request.topk_prompt_logprobs, sampler.vocab_size)
        top = torch.topk(lp_NV[:-1], k, dim=-1)
        answer["topk_prompt_logprobs"] = [None] + [
            [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
            for ids, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
    return answer


def _generate(
    sampler: SamplerModel,
    prompt: list[int],
    params: SamplingParamsWire,
    max_tokens: int,
    generator: torch.Generator,
) -> tuple[JsonDict, torch.Tensor]:
    """One sequence (KV-cached decoding); also the prompt's fp32 logits [N, V]."""
    ids = torch.tensor([prompt], device=sampler.device)
    # One cache object, updated in place by every call (passed under this version's name).
    cache = {sampler.cache_kwarg: DynamicCache()}
    out = sampler.model(input_ids=ids, use_cache=True, **cache)
    prompt_logits_NV = out.logits[0].float()
    logits_V = prompt_logits_NV[-1]
    tokens: list[int] = []
    logprobs: list[float] = []
    stop_reason = "length"
    for _ in range(max_tokens):
        token, logprob = _draw(logits_V, params, generator)
        tokens.append(token)
        logprobs.append(logprob)
        if _stops(sampler, tokens, params):
            stop_reason = "stop"
            break
        step = torch.tensor([[token]], device=sampler.device)
        out = sampler.model(input_ids=step, use_cache=True, **cache)
        logits_V = out.logits[0, -1].float()
    sequence = {"stop_reason": stop_reason, "tokens": tokens, "logprobs": logprobs}
    return sequence, prompt_logits_NV


def _draw(
    logits_V: torch.Tensor, params: SamplingParamsWire, generator: torch.Generator
) -> tuple[int, float]:
    """A token and its logprob under the distribution it was drawn from (fp32)."""
    if params.temperature == 0:  # greedy
        lp_V = torch.log_softmax(logits_V, dim=-1)
        token = int(torch.argmax(lp_V))
        return token, float(lp_V[token])
    lp_V = torch.log_softmax(logits_V / params.temperature, dim=-1)
    if 0 < params.top_k < lp_V.numel():
        kth = torch.topk(lp_V, params.top_k).values[-1]
        lp_V = lp_V.masked_fill(lp_V < kth, float("-inf"))
    if params.top_p < 1:
        sorted_lp, order = torch.sort(lp_V, descending=True)
        mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()
        dropped = order[mass_before >= params.top_p]  # the top token always stays
        lp_V = lp_V.index_fill(0, dropped, float("-inf"))
    lp_V = torch.log_softmax(lp_V, dim=-1)  # renormalised over what may be drawn
    token = int(torch.multinomial(lp_V.exp().cpu(), 1, generator=generator))
    return token, float(lp_V[token])


def _stops(sampler: SamplerModel, tokens: list[int], params: SamplingParamsWire) -> bool:
    stop = params.stop
    if stop is None:
        return tokens[-1] in sampler.eos_token_ids
    if isinstance(stop, str):
        stop = [stop]
    if not stop:
        return False  # [] disables stopping, EOS included
    if all(isinstance(s, int) for s in stop):
        return tokens[-1] in stop
    text = sampler.decode(tokens)
    return any(isinstance(s, str) and s in text for s in stop)


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
