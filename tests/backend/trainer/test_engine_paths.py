"""The engine's compute paths against the reference fp32 path: chunked log-softmax, batched
losses, fused AdamW and bf16 autocast, on synthetic tensors and on the tiny model (CPU).

Tolerances: fp32 paths differ from the reference only by float rounding (logsumexp instead of
log_softmax, other summation orders), within 1e-5 relative. bf16 autocast rounds every matmul
input to 8 bits of mantissa; see `BF16_*` for what was measured and what is allowed.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel
from backend.trainer.engine_paths import (
    EnginePlan,
    batched_losses,
    chunked_target_logprobs,
    resolve_engine,
)
from backend.trainer.errors import UserError
from backend.trainer.losses import LOSSES
from backend.trainer.settings import AdamSettings, EngineSettings, LoraSettings

BASE = "fireloop/tiny"
TRAIN = AdamSettings(learning_rate=3e-3, weight_decay=0.01, grad_clip_norm=1.0)
# fp32 paths: float rounding only.
FP32_RTOL = 1e-5
# bf16 autocast vs fp32 on the tiny model, measured over three cross-entropy batches (full
# and LoRA): summed loss within 4e-5 relative, logprobs within 4e-3 absolute, the gradient's
# norm-relative error 0.9-1.0e-2. bf16 keeps 8 mantissa bits (rounding 2^-9 ≈ 2e-3 of each
# matmul operand) and the gradient multiplies several rounded factors per layer, hence its
# larger error. Allowed: a few times the measured values. Clipped RL losses (ppo, dapo) are
# discontinuous where a ratio crosses a bound, so a bf16 ratio on the other side of it moves
# the gradient by more than rounding (measured up to 0.2 on one batch); the tolerance is
# stated on the smooth loss.
BF16_LOSS_RTOL = 1e-3
BF16_GRAD_RTOL = 3e-2
BF16_LOGPROB_ATOL = 2e-2
FP32_FAST = EngineSettings.fast(autocast="off", logprob_chunk=5)


# -- resolution ---------------------------------------------------------------------------------


def test_auto_is_the_reference_path_on_cpu_and_the_fast_path_on_cuda() -> None:
    assert resolve_engine(EngineSettings(), torch.device("cpu"), "qwen3") == EnginePlan()
    cuda = resolve_engine(EngineSettings(), torch.device("cuda"), "llama")
    assert cuda == EnginePlan(
        autocast_dtype=torch.bfloat16, optimizer="fused", logprob_chunk=256, batched_losses=True
    )


def test_options_a_device_or_model_cannot_run_are_refused_by_name() -> None:
    with pytest.raises(UserError, match=r"engine\.compile needs a CUDA device.*cpu"):
        resolve_engine(EngineSettings(compile=True), torch.device("cpu"), "qwen3")
    with pytest.raises(UserError, match=r"engine\.optimizer 'fused' is not supported on meta"):
        resolve_engine(EngineSettings(optimizer="fused"), torch.device("meta"), "qwen3")
    with pytest.raises(UserError, match=r"engine\.logprob_chunk: model type 'gemma2'"):
        resolve_engine(EngineSettings(logprob_chunk=8), torch.device("cpu"), "gemma2")
    # Without chunking any architecture runs.
    assert resolve_engine(EngineSettings(), torch.device("cpu"), "gemma2") == EnginePlan()
    with pytest.raises(ValidationError, match="logprob_chunk must be >= 0"):
        EngineSettings(logprob_chunk=-1)


def test_compile_on_cpu_is_refused_when_the_model_loads(tiny_dir: Path) -> None:
    with pytest.raises(UserError, match=r"engine\.compile needs a CUDA device"):
        TrainableModel(tiny_dir, base_model=BASE, engine=EngineSettings(compile=True))


# -- chunked log-softmax on synthetic tensors -------------------------------------------------


class StubDecoder(torch.nn.Module):
    """Embedding + tanh: a decoder with a `last_hidden_state`, enough to exercise the head."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=torch.tanh(self.embed(input_ids)))


def _stub(seed: int, vocab: int = 97, hidden: int = 16) -> tuple[StubDecoder, torch.nn.Linear]:
    torch.manual_seed(seed)
    decoder = StubDecoder(vocab, hidden)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    head.weight.data.mul_(4.0)  # peaked distributions, where log-softmax rounding shows
    return decoder, head


def _full_logprobs(
    decoder: StubDecoder, head: torch.nn.Linear, tokens: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(decoder(tokens).last_hidden_state).float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _grads(*modules: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]
    for m in modules:
        m.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk", [1, 7, 40, 64])  # 40 = T: one chunk; 64 > T
def test_chunked_logprobs_and_gradients_match_the_full_log_softmax(chunk: int) -> None:
    decoder, head = _stub(0)
    tokens = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(tokens, -1, dims=1)
    upstream = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))

    full = _full_logprobs(decoder, head, tokens, targets)
    (full * upstream).sum().backward()
    full_grads = _grads(decoder, head)
    chunked = chunked_target_logprobs(
        decoder, head, tokens, targets, None, chunk=chunk, autocast=nullcontext
    )
    (chunked * upstream).sum().backward()
    chunked_grads = _grads(decoder, head)

    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)
    assert len(chunked_grads) == len(full_grads) == 2
    for got, want in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _largest_saved_logits(run: Any, vocab: int) -> int:
    """Elements of the largest (B, T, V)-like tensor autograd keeps for backward while `run()`
    builds its graph (the head's (V, D) weight is 2-D and not counted)."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3 and t.shape[-1] == vocab:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run().sum().backward()
    return max(sizes)


def test_chunking_never_keeps_a_batch_by_sequence_by_vocabulary_tensor_for_backward() -> None:
    decoder, head = _stub(0, vocab=512)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(tokens, -1, dims=1)

    full = _largest_saved_logits(lambda: _full_logprobs(decoder, head, tokens, targets), 512)
    chunked = _largest_saved_logits(
        lambda: chunked_target_logprobs(
            decoder, head, tokens, targets, None, chunk=8, autocast=nullcontext
        ),
        512,
    )
    assert full >= 2 * 64 * 512  # the probe sees the full path's BxTxV logits
    assert chunked <= 2 * 8 * 512  # recomputed in backward: at most one chunk, here none kept


class CountingHead(torch.nn.Linear):
    """A head that records the number of positions of every call."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__(hidden, vocab, bias=False)
        self.positions: list[int] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.positions.append(hidden.shape[1])
        return super().forward(hidden)


def test_a_wide_batch_takes_fewer_positions_per_chunk_under_the_logits_budget() -> None:
    decoder, head = StubDecoder(512, 16), CountingHead(16, 512)
    tokens = torch.randint(0, 512, (4, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chunked_target_logprobs(
            decoder,
            head,
            tokens,
            tokens,
            None,
            chunk=8,
            autocast=nullcontext,
            max_chunk_logits=4 * 3 * 512,  # room for 3 positions of 4 sequences
        )
        assert head.positions == [3] * 6 + [2]
        head.positions.clear()
        chunked_target_logprobs(  # a budget below one position still makes progress
            decoder,
            head,
            tokens,
            tokens,
            None,
            chunk=8,
            autocast=nullcontext,
            max_chunk_logits=100,
        )
        assert head.positions == [1] * 20


# -- batched losses on synthetic tensors ------------------------------------------------------


def _rl_datum(generator: torch.Generator, n: int, keys: tuple[str, ...]) -> Datum:
    lp_shift = 0.3 * torch.randn(n, generator=generator)
    advantages = torch.randn(n, generator=generator)
    advantages[: n // 3] = 0.0  # prompt positions: zero advantage
    inputs = {
        "target_tokens": torch.randint(0, 50, (n,), generator=generator),
        "logprobs": -1.0 + lp_shift,
        "advantages": advantages,
    }
    if "weights" in keys:
        inputs["weights"] = (torch.rand(n, generator=generator) > 0.2).float()
    if "clip_low_threshold" in keys:
        inputs["clip_low_threshold"] = torch.full((n,), 0.7)
        inputs["clip_high_threshold"] = torch.full((n,), 1.4)
    if "sequence_ratio_mask" in keys:
        inputs["sequence_ratio_mask"] = (torch.arange(n) >= n // 2).float()
    return Datum(tokens=list(range(n)), loss_fn_inputs=inputs)


def _batch(seed: int) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    shapes: list[tuple[int, tuple[str, ...]]] = [
        (9, ("weights",)),
        (13, ("weights",)),
        (4, ()),  # no weights: the RL mask falls back to advantages ≠ 0
        (11, ("weights", "clip_low_threshold", "sequence_ratio_mask")),
        (1, ("weights",)),
    ]
    return [_rl_datum(generator, n, keys) for n, keys in shapes]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batched_losses_equal_one_call_per_datum(name: str) -> None:
    loss = LOSSES[name]
    config = loss.parse_config({})
    datums = _batch(3)
    if name == "cross_entropy":  # the custom-loss phase 2 sends any real weights
        for datum in datums:
            datum.loss_fn_inputs["weights"] = torch.randn(datum.num_tokens)
    T = max(d.num_tokens for d in datums)
    lp_BT = (-1.0 + 0.3 * torch.randn(len(datums), T)).requires_grad_(True)

    per_datum = [
        loss(lp_BT[b, : d.num_tokens], d.loss_fn_inputs, config) for b, d in enumerate(datums)
    ]
    torch.stack([out.loss for out in per_datum]).sum().backward()
    want_grad = lp_BT.grad.clone()  # type: ignore[union-attr]
    lp_BT.grad = None
    batched = batched_losses(loss, config, lp_BT, datums, torch.device("cpu"))
    torch.stack([out.loss for _, out in batched]).sum().backward()

    for b, ((lp_N, got), want) in enumerate(zip(batched, per_datum, strict=True)):
        assert torch.equal(lp_N, lp_BT[b, : datums[b].num_tokens])
        torch.testing.assert_close(got.loss_N, want.loss_N, rtol=1e-6, atol=1e-7)
        assert got.metrics.keys() == want.metrics.keys()
        for key in want.metrics:
            torch.testing.assert_close(got.metrics[key], want.metrics[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp_BT.grad, want_grad, rtol=1e-6, atol=1e-7)
    assert lp_BT.grad is not None and bool((lp_BT.grad[4, 1:] == 0).all())  # padding: no grad


# -- the tiny model: fast fp32 path and bf16 autocast against the reference --------------------


def _datums(seed: int) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    datums = []
    for n in (24, 17, 30, 9):
        ids = torch.randint(0, 256, (n + 1,), generator=generator)
        inputs = {
            "target_tokens": ids[1:],
            "weights": (torch.arange(n) >= 3).float(),
            "logprobs": -5.5 + 0.2 * torch.randn(n, generator=generator),
            "advantages": torch.randn(n, generator=generator),
        }
        datums.append(Datum(tokens=ids[:-1].tolist(), loss_fn_inputs=inputs))
    return datums


def _norm_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys() and want
    diff = torch.stack([(got[k] - want[k]).norm() for k in want]).norm()
    return float(diff / torch.stack([w.norm() for w in want.values()]).norm())


@pytest.mark.parametrize("lora", [None, LoraSettings(rank=4)], ids=["full", "lora"])
@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_fast_fp32_path_matches_the_reference_on_the_tiny_model(
    tiny_dir: Path, lora: LoraSettings | None, loss_fn: str
) -> None:
    reference = TrainableModel(tiny_dir, base_model=BASE, lora=lora)
    fast = TrainableModel(tiny_dir, base_model=BASE, lora=lora, engine=FP32_FAST)
    assert fast.engine_plan.describe() == "fp32, fused AdamW, chunk 5, batched losses"
    for step in range(2):
        want = reference.forward_backward(_datums(step), loss_fn, {})
        got = fast.forward_backward(_datums(step), loss_fn, {})
        for got_lp, want_lp in zip(got.logprobs, want.logprobs, strict=True):
            torch.testing.assert_close(got_lp, want_lp, rtol=FP32_RTOL, atol=1e-5)
        for got_loss, want_loss in zip(got.elementwise_loss, want.elementwise_loss, strict=True):
            torch.testing.assert_close(got_loss, want_loss, rtol=FP32_RTOL, atol=1e-5)
        assert got.metrics.keys() == want.metrics.keys()
        for key, value in want.metrics.items():
            assert got.metrics[key] == pytest.approx(value, rel=FP32_RTOL, abs=1e-6), key
        grads = fast.accumulated_gradients()
        assert _norm_rel(grads, reference.accumulated_gradients()) < FP32_RTOL
        reference.optim_step(TRAIN, "num_loss_tokens")
        fast.optim_step(TRAIN, "num_loss_tokens")  # fused AdamW against single-tensor
        assert _norm_rel(fast.trainable_weights(), reference.trainable_weights()) < 1e-6


@pytest.mark.parametrize("lora", [None, LoraSettings(rank=4)], ids=["full", "lora"])
def test_bf16_autocast_stays_within_its_stated_tolerance(
    tiny_dir: Path, lora: LoraSettings | None
) -> None:
    reference = TrainableModel(tiny_dir, base_model=BASE, lora=lora)
    bf16 = TrainableModel(tiny_dir, base_model=BASE, lora=lora, engine=EngineSettings.fast())
    want = reference.forward_backward(_datums(0), "cross_entropy", {})
    got = bf16.forward_backward(_datums(0), "cross_entropy", {})
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=BF16_LOSS_RTOL)
    for got_lp, want_lp in zip(got.logprobs, want.logprobs, strict=True):
        assert got_lp.dtype == torch.float32
        torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=BF16_LOGPROB_ATOL)
    grads = bf16.accumulated_gradients()
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 masters
    assert _norm_rel(grads, reference.accumulated_gradients()) < BF16_GRAD_RTOL
    bf16.optim_step(TRAIN, "num_loss_tokens")
    assert all(w.dtype == torch.float32 for w in bf16.trainable_weights().values())


def test_a_state_saved_on_one_path_resumes_on_another(tiny_dir: Path, tmp_path: Path) -> None:
    reference = TrainableModel(tiny_dir, base_model=BASE)
    reference.forward_backward(_datums(0), "cross_entropy", {})
    reference.optim_step(TRAIN, "num_loss_tokens")
    reference.save_state(tmp_path / "state")
    fast = TrainableModel(tiny_dir, base_model=BASE, engine=FP32_FAST)
    fast.load_state(tmp_path / "state", with_optimizer=True)
    for model in (reference, fast):
        model.forward_backward(_datums(1), "cross_entropy", {})
        model.optim_step(TRAIN, "num_loss_tokens")
    assert fast.step == reference.step == 2
    assert _norm_rel(fast.trainable_weights(), reference.trainable_weights()) < 1e-6
