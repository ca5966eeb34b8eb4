"""The static KV cache decodes what the dynamic one does: same tokens, logprobs within 1e-5.

Both decoders run the tiny model on CPU with the same arrivals (three sequences, then two more
after every decode step, so sequences join a running batch); the dynamic path is the reference.
Logprobs differ only by fp32 summation order over a wider (masked) attention window: measured
about 5e-7, asserted within 1e-5.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from backend.models.store import ensure_model_dir, model_context_length, resolve_models_dir
from backend.serving.engine import (
    ENGINE_ENV,
    ServingEngineSettings,
    ServingPlan,
    resolve_serving_engine,
)
from backend.serving.generation import (
    BatchDecoder,
    DecodingModel,
    DecodingSequence,
    SequenceSpec,
    SequenceTooLongError,
)
from backend.serving.sampling import SamplingParams
from backend.serving.slots import StaticBatchDecoder, new_decoder
from backend.serving.weights import ModelFactory

TOLERANCE = 1e-5
MAX_LEN = 48


@pytest.fixture(scope="module")
def factory() -> ModelFactory:
    models = resolve_models_dir()
    context = model_context_length("tiny", models)
    return ModelFactory(ensure_model_dir("tiny", models), torch.device("cpu"), context)


@pytest.fixture(scope="module")
def model(factory: ModelFactory) -> DecodingModel:
    return factory.base()


def _sequences(sampling: SamplingParams, count: int = 9, **spec: object) -> list[DecodingSequence]:
    rng = random.Random(7)
    out = []
    for index in range(count):
        prompt = tuple(rng.randrange(32, 250) for _ in range(rng.randrange(2, 14)))
        max_tokens = rng.randrange(1, 24)
        out.append(
            DecodingSequence(SequenceSpec(prompt, max_tokens, sampling, seed=index, **spec))  # type: ignore[arg-type]
        )
    return out


def _decode_with_arrivals(decoder: BatchDecoder, sequences: Sequence[DecodingSequence]) -> int:
    """Three sequences first, two more after each step; the most running at once."""
    decoder.admit(sequences[:3])
    joined, peak = 3, len(decoder.active)
    while decoder.active or joined < len(sequences):
        decoder.step()
        decoder.admit(sequences[joined : joined + 2])
        joined += 2
        peak = max(peak, len(decoder.active))
    return peak


def _static(model: DecodingModel, max_len: int = MAX_LEN) -> StaticBatchDecoder:
    return StaticBatchDecoder(model, ServingPlan(static_max_len=max_len))


def _assert_same(reference: list[DecodingSequence], static: list[DecodingSequence]) -> None:
    for expected, got in zip(reference, static, strict=True):
        assert got.tokens == expected.tokens
        assert got.finish_reason == expected.finish_reason
        for want, have in zip(expected.logprobs, got.logprobs, strict=True):
            assert have.logprob == pytest.approx(want.logprob, abs=TOLERANCE)
            assert want.sampling_logprob is not None and have.sampling_logprob is not None
            assert have.sampling_logprob == pytest.approx(want.sampling_logprob, abs=TOLERANCE)
            assert [t for t, _ in have.top] == [t for t, _ in want.top]


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=0), SamplingParams(), SamplingParams(0.8, top_p=0.9, top_k=40)],
    ids=["greedy", "sampled", "filtered"],
)
def test_static_decoding_matches_dynamic_with_mixed_arrivals(
    model: DecodingModel, sampling: SamplingParams
) -> None:
    reference, static = _sequences(sampling), _sequences(sampling)
    _decode_with_arrivals(BatchDecoder(model), reference)
    _decode_with_arrivals(_static(model), static)
    assert all(s.finish_reason is not None for s in static)
    _assert_same(reference, static)


def test_prompt_and_top_logprobs_match_dynamic(model: DecodingModel) -> None:
    spec = {"prompt_logprobs": True, "top_logprobs": 3}
    reference = _sequences(SamplingParams(), count=4, **spec)
    static = _sequences(SamplingParams(), count=4, **spec)
    _decode_with_arrivals(BatchDecoder(model), reference)
    _decode_with_arrivals(_static(model), static)
    _assert_same(reference, static)
    for expected, got in zip(reference, static, strict=True):
        assert [p.token_id for p in got.prompt_logprobs] == list(expected.spec.prompt[1:])
        for want, have in zip(expected.prompt_logprobs, got.prompt_logprobs, strict=True):
            assert have.logprob == pytest.approx(want.logprob, abs=TOLERANCE)


def test_slots_are_reused_after_completions(model: DecodingModel) -> None:
    decoder = _static(model)
    peak = _decode_with_arrivals(decoder, _sequences(SamplingParams(temperature=0)))
    capacity = decoder.capacity
    assert peak <= capacity < 2 * peak  # grown by doubling to the peak, no further
    assert decoder.active == [] and decoder.slots == []
    # A second wave as large as the first finds its slots free: no new buffers.
    buffers = [t.data_ptr() for t in decoder._slot_cache.keys]
    again = _sequences(SamplingParams(temperature=0))
    _decode_with_arrivals(decoder, again)
    assert decoder.capacity == capacity
    assert [t.data_ptr() for t in decoder._slot_cache.keys] == buffers
    reference = _sequences(SamplingParams(temperature=0))
    _decode_with_arrivals(BatchDecoder(model), reference)
    _assert_same(reference, again)  # stale KV left by earlier occupants is never read


def test_a_running_sequence_keeps_its_slot_while_others_come_and_go(model: DecodingModel) -> None:
    decoder = _static(model)
    long_one = DecodingSequence(SequenceSpec((40, 41, 42), 30, SamplingParams(0), seed=0))
    decoder.admit([long_one])
    for index in range(5):
        short = DecodingSequence(SequenceSpec((50 + index,), 2, SamplingParams(0), seed=index))
        decoder.admit([short])
        assert decoder.slots == [0, 1]  # the newcomer takes the slot its predecessor left
        decoder.step()
        decoder.step()
        assert decoder.slots == [0]
    while decoder.active:
        decoder.step()
    reference = DecodingSequence(SequenceSpec((40, 41, 42), 30, SamplingParams(0), seed=0))
    _decode_with_arrivals(BatchDecoder(model), [reference])
    assert long_one.tokens == reference.tokens and len(long_one.tokens) == 30


def test_a_sequence_that_cannot_fit_is_refused_naming_the_limit(model: DecodingModel) -> None:
    decoder = _static(model, max_len=16)
    fits = DecodingSequence(SequenceSpec(tuple(range(32, 42)), 6, SamplingParams(0), seed=0))
    too_long = DecodingSequence(SequenceSpec(tuple(range(32, 42)), 7, SamplingParams(0), seed=0))
    decoder.check_fits(fits.spec)
    with pytest.raises(
        SequenceTooLongError, match=r"10 tokens.*max_tokens \(7\).*16 tokens.*static_max_len"
    ):
        decoder.admit([too_long])
    assert decoder.active == []
    decoder.admit([fits])
    while decoder.active:
        decoder.step()
    assert len(fits.tokens) == 6 and fits.finish_reason == "length"
    BatchDecoder(model).check_fits(too_long.spec)  # the dynamic cache has no such limit


def test_a_swap_keeps_the_buffers_and_decodes_with_the_new_weights(
    factory: ModelFactory, model: DecodingModel
) -> None:
    other = factory.base()
    with torch.no_grad():
        for parameter in other.module.parameters():
            parameter.mul_(1.5)
    decoder = _static(model)
    _decode_with_arrivals(decoder, _sequences(SamplingParams(temperature=0), count=3))
    buffers = [t.data_ptr() for t in decoder._slot_cache.keys]
    decoder.serve(other)
    swapped = _sequences(SamplingParams(temperature=0), count=3)
    _decode_with_arrivals(decoder, swapped)
    assert [t.data_ptr() for t in decoder._slot_cache.keys] == buffers
    reference = _sequences(SamplingParams(temperature=0), count=3)
    _decode_with_arrivals(BatchDecoder(other), reference)
    _assert_same(reference, swapped)


def test_engine_auto_is_dynamic_on_cpu_and_static_on_cuda(model: DecodingModel) -> None:
    auto = ServingEngineSettings()
    assert resolve_serving_engine(auto, "cpu", 8192) == ServingPlan()
    assert resolve_serving_engine(auto, "cuda", 8192) == ServingPlan(static_max_len=2048)
    assert resolve_serving_engine(auto, "cuda", 256) == ServingPlan(static_max_len=256)
    static = ServingEngineSettings(kv_cache="static", static_max_len=100)
    assert resolve_serving_engine(static, "cpu", 256).static_max_len == 100
    assert isinstance(new_decoder(model, ServingPlan()), BatchDecoder)
    assert isinstance(new_decoder(model, ServingPlan(static_max_len=8)), StaticBatchDecoder)


def test_engine_options_a_device_cannot_run_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="compile_decode needs a CUDA device"):
        resolve_serving_engine(ServingEngineSettings(compile_decode=True), "cpu", 256)
    with pytest.raises(ValueError, match=r"static_max_len must be in \[2, 256\]"):
        resolve_serving_engine(
            ServingEngineSettings(kv_cache="static", static_max_len=512), "cpu", 256
        )
    with pytest.raises(ValueError, match="compile_decode needs kv_cache 'static'"):
        resolve_serving_engine(
            ServingEngineSettings(kv_cache="dynamic", compile_decode=True), "cuda", 256
        )


def test_engine_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENGINE_ENV, '{"kv_cache": "static", "static_max_len": 64}')
    assert ServingEngineSettings.from_env() == ServingEngineSettings(
        kv_cache="static", static_max_len=64
    )
    monkeypatch.setenv(ENGINE_ENV, '{"kv_cache": "paged"}')
    with pytest.raises(ValueError, match=ENGINE_ENV):
        ServingEngineSettings.from_env()
    monkeypatch.delenv(ENGINE_ENV)
    assert ServingEngineSettings.from_env() == ServingEngineSettings()


def test_the_compiled_decode_step_traces_whole_and_decodes_alike(
    model: DecodingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA-only compiled step, traced by dynamo on CPU with its eager backend (no
    inductor): the slot cache's update compiles without graph breaks, into few graphs, and
    the tokens are the dynamic path's."""
    import torch._dynamo.utils as dynamo_utils

    compile_ = torch.compile
    modes: list[object] = []

    def eager_compile(module: torch.nn.Module, **options: object) -> object:
        modes.append(options.get("mode"))
        return compile_(module, backend="eager", dynamic=False)

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    reference = _sequences(SamplingParams(temperature=0), count=6)
    compiled = _sequences(SamplingParams(temperature=0), count=6)
    _decode_with_arrivals(BatchDecoder(model), reference)
    plan = ServingPlan(static_max_len=MAX_LEN, compile_decode=True)
    _decode_with_arrivals(StaticBatchDecoder(model, plan), compiled)
    _assert_same(reference, compiled)
    assert modes == ["reduce-overhead"]
    assert not dynamo_utils.counters["graph_break"]
    assert 1 <= dynamo_utils.counters["stats"]["unique_graphs"] <= 4
