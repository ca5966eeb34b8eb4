"""The engine never applies a step that leaves weights or optimizer state non-finite.

Hyper-parameters the wire would refuse are built with `model_construct`, so these tests reach
the engine's own guard: the last line, behind the wire's validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel, _step_bounded, _step_stays_finite
from backend.trainer.errors import UserError
from backend.trainer.settings import AdamSettings, LoraSettings

BASE = "fireloop/tiny"
STEP = AdamSettings(learning_rate=1e-2)


def _datum(ids: list[int], weight: float = 1.0) -> Datum:
    n = len(ids) - 1
    inputs = {
        "target_tokens": torch.tensor(ids[1:], dtype=torch.int64),
        "weights": torch.full((n,), weight),
    }
    return Datum(tokens=ids[:-1], loss_fn_inputs=inputs)


BATCH = [_datum([5, 6, 7, 8, 9]), _datum([10, 11, 12])]


def _snapshot(model: TrainableModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights and every optimizer tensor, copied."""
    weights = model.trainable_weights()
    optimizer = model._optimizer  # read-only look: the state a refused step must not touch
    assert optimizer is not None
    moments = {
        f"{name}.{key}": value.detach().clone()
        for name, p in model._trainable
        for key, value in optimizer.state.get(p, {}).items()
    }
    return weights, moments


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("lora", [None, LoraSettings(rank=4)], ids=["full", "lora"])
@pytest.mark.parametrize(
    "adam",
    [
        AdamSettings.model_construct(learning_rate=float("inf")),
        AdamSettings.model_construct(learning_rate=float("nan")),
        AdamSettings.model_construct(weight_decay=float("inf"), learning_rate=1e-2),
        # Finite hyper-parameters whose product overflows float32 weights.
        AdamSettings.model_construct(learning_rate=3e38, weight_decay=10.0),
    ],
    ids=["lr-inf", "lr-nan", "wd-inf", "overflow"],
)
def test_a_step_that_would_go_non_finite_is_refused_and_changes_nothing(
    tiny_dir: Path, lora: LoraSettings | None, adam: AdamSettings
) -> None:
    model = TrainableModel(tiny_dir, base_model=BASE, lora=lora)
    model.forward_backward(BATCH, "cross_entropy", None)
    model.optim_step(STEP)  # optimizer moments exist: they must survive the refusal too
    model.forward_backward(BATCH, "cross_entropy", None)
    before = _snapshot(model)
    with pytest.raises(UserError, match="non-finite"):
        model.optim_step(adam)
    after = _snapshot(model)
    _assert_bitwise_equal(before[0], after[0])
    _assert_bitwise_equal(before[1], after[1])
    assert model.step == 1
    # The gradients were dropped: a new forward_backward and a valid step train normally.
    model.forward_backward(BATCH, "cross_entropy", None)
    model.optim_step(STEP)
    assert model.step == 2
    weights = model.trainable_weights()
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[n], before[0][n]) for n in weights)


def test_non_finite_gradients_are_refused_and_dropped(tiny_dir: Path) -> None:
    model = TrainableModel(tiny_dir, base_model=BASE)
    # Loss weights at the float32 limit: the summed loss, and so its gradients, overflow.
    model.forward_backward([_datum([5, 6, 7, 8, 9], weight=3e38)], "cross_entropy", None)
    before = _snapshot(model)
    with pytest.raises(UserError, match="gradients are not finite"):
        model.optim_step(STEP)
    _assert_bitwise_equal(before[0], _snapshot(model)[0])
    assert all(p.grad is None for _, p in model._trainable)
    model.forward_backward(BATCH, "cross_entropy", None)
    model.optim_step(STEP)
    assert model.step == 1


def test_a_guarded_step_is_exactly_torch_adamw(tiny_dir: Path) -> None:
    # The guard must not change training: same result as AdamW on a bare copy of the weights.
    model = TrainableModel(tiny_dir, base_model=BASE)
    reference = {n: p.detach().clone().requires_grad_(True) for n, p in model._trainable}
    optimizer = torch.optim.AdamW(
        reference.values(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8
    )
    adam = AdamSettings(learning_rate=3e-3, weight_decay=0.1, eps=1e-8)
    for _ in range(2):
        model.forward_backward(BATCH, "cross_entropy", None)
        for name, p in model._trainable:
            reference[name].grad = None if p.grad is None else p.grad.clone()
        model.optim_step(adam)
        optimizer.step()
    _assert_bitwise_equal(model.trainable_weights(), {n: t.detach() for n, t in reference.items()})


def _with_gradients(model: TrainableModel, scale: float) -> None:
    """Deterministic gradients of a chosen size, set directly (no loss can make them)."""
    generator = torch.Generator().manual_seed(0)
    for _, p in model._trainable:
        p.grad = torch.randn(p.shape, generator=generator) * scale


def _reference_step(
    model: TrainableModel, adam: AdamSettings, steps: int, divisor: float
) -> dict[str, torch.Tensor]:
    """The step in plain torch: normalise, `clip_grad_norm_` (if set), AdamW on a bare copy."""
    reference = {n: p.detach().clone().requires_grad_(True) for n, p in model._trainable}
    optimizer = torch.optim.AdamW(
        reference.values(),
        lr=adam.learning_rate,
        betas=(adam.beta1, adam.beta2),
        eps=adam.eps,
        weight_decay=adam.weight_decay,
        foreach=False,
    )
    for _ in range(steps):
        model.forward_backward(BATCH, "cross_entropy", None)
        for name, p in model._trainable:
            assert p.grad is not None
            reference[name].grad = p.grad.clone() / divisor
        grads = [t.grad for t in reference.values() if t.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if adam.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(reference.values()), adam.grad_clip_norm)
        metrics = model.optim_step(adam, "num_sequences")
        assert metrics["grad_norm:mean"] == float(norm)  # the pre-clip norm, bit for bit
        optimizer.step()
    return {n: t.detach() for n, t in reference.items()}


@pytest.mark.parametrize("lora", [None, LoraSettings(rank=4)], ids=["full", "lora"])
def test_a_clipped_normalised_step_is_exactly_plain_torch(
    tiny_dir: Path, lora: LoraSettings | None
) -> None:
    # The cheap checks change no arithmetic: weights and the grad_norm metric are bitwise
    # those of dividing, clip_grad_norm_ and torch's AdamW (the moments follow from them).
    model = TrainableModel(tiny_dir, base_model=BASE, lora=lora)
    adam = AdamSettings(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=0.05)
    reference = _reference_step(model, adam, steps=3, divisor=len(BATCH))
    _assert_bitwise_equal(model.trainable_weights(), reference)


@pytest.mark.parametrize(
    ("lr", "wd", "eps", "scale"),
    [
        (1e-2, 0.0, 1e-8, 1e-3),
        (1e-2, 0.1, 1e-8, 1e3),
        (1e20, 0.0, 1e-8, 1.0),
        (1e-2, 0.0, 1e-37, 1.0),
        (1.0, 1e36, 1e-8, 1.0),
        (1.0, 1e39, 1e-8, 1.0),
        (3e38, 10.0, 1e-8, 1.0),
        (1e-2, 0.0, 1e-8, 1e19),
        (1e-2, 0.0, 0.0, 1.0),
    ],
)
def test_the_scalar_bound_never_passes_a_step_the_dry_run_refuses(
    tiny_dir: Path, lr: float, wd: float, eps: float, scale: float
) -> None:
    model = TrainableModel(tiny_dir, base_model=BASE)
    model.forward_backward(BATCH, "cross_entropy", None)
    model.optim_step(STEP)  # moments exist
    _with_gradients(model, scale)
    adam = AdamSettings.model_construct(learning_rate=lr, weight_decay=wd, eps=eps)
    optimizer = model._optimizer
    assert optimizer is not None
    params = [p for _, p in model._trainable]
    grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if _step_bounded(optimizer, params, adam, grad_norm):
        assert _step_stays_finite(optimizer, params, adam)


def test_ordinary_steps_are_proven_by_the_bound(tiny_dir: Path) -> None:
    # The fast path is the common one: without this the dry run would run every step.
    model = TrainableModel(tiny_dir, base_model=BASE)
    model.forward_backward(BATCH, "cross_entropy", None)
    model.optim_step(STEP)
    _with_gradients(model, 1.0)
    optimizer = model._optimizer
    assert optimizer is not None
    params = [p for _, p in model._trainable]
    assert _step_bounded(optimizer, params, AdamSettings(learning_rate=1e-3), 1e3)


def test_a_large_safe_step_the_bound_cannot_prove_is_still_taken(tiny_dir: Path) -> None:
    # Weight decay 1e36 scales the weights to ~1e35: finite, so the exact dry run lets it
    # through, though the bound (kept far below the float32 limit) cannot prove it.
    adam = AdamSettings.model_construct(learning_rate=1.0, weight_decay=1e36)
    model = TrainableModel(tiny_dir, base_model=BASE)
    optimizer = model._optimizer
    assert optimizer is not None
    params = [p for _, p in model._trainable]
    model.forward_backward(BATCH, "cross_entropy", None)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = float(torch.nn.utils.get_total_norm(grads))
    assert not _step_bounded(optimizer, params, adam, grad_norm)
    model._clear_gradients()
    reference = _reference_step(model, adam, steps=1, divisor=len(BATCH))
    assert model.step == 1
    weights = model.trainable_weights()
    _assert_bitwise_equal(weights, reference)
    assert max(float(w.abs().max()) for w in weights.values()) > 1e30


def test_finite_gradients_whose_norm_overflows_are_not_called_non_finite(tiny_dir: Path) -> None:
    # Gradients of 1e20 are finite, but their sum of squares overflows float32: the per-tensor
    # check, not the norm, decides; clipping by an infinite norm then zeroes them.
    model = TrainableModel(tiny_dir, base_model=BASE)
    _with_gradients(model, 1e20)
    before = model.trainable_weights()
    metrics = model.optim_step(AdamSettings(learning_rate=1e-2, grad_clip_norm=1.0))
    assert metrics["grad_norm:mean"] == float("inf")
    assert model.step == 1
    _assert_bitwise_equal(before, model.trainable_weights())
