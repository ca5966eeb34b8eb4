"""The engine never applies a step that leaves weights or optimizer state non-finite.

Hyper-parameters the wire would refuse are built with `model_construct`, so these tests reach
the engine's own guard: the last line, behind the wire's validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel
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
