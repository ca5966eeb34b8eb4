"""Learning-rate schedules: hand-computed values at the interesting steps."""

from __future__ import annotations

import math

import pytest

from algorithms.schedules import learning_rate_at


def test_constant_is_the_peak_after_warmup() -> None:
    rates = [learning_rate_at(s, peak=1.0, total_steps=10, warmup_steps=4) for s in range(6)]
    assert rates == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_warmup_starts_at_the_minimum() -> None:
    lr = learning_rate_at(0, peak=1.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr == pytest.approx(0.1)


def test_linear_decays_to_the_minimum() -> None:
    def lr(step: int) -> float:
        return learning_rate_at(step, peak=1.0, total_steps=10, schedule="linear", min_lr_ratio=0.2)

    assert [lr(0), lr(5), lr(10)] == pytest.approx([1.0, 0.6, 0.2])


def test_cosine_follows_the_formula() -> None:
    def lr(step: int) -> float:
        return learning_rate_at(step, peak=2.0, total_steps=8, schedule="cosine", warmup_steps=4)

    assert lr(4) == pytest.approx(2.0)
    assert lr(6) == pytest.approx(0.5 * 2.0 * (1 + math.cos(math.pi * 0.5)))
    assert lr(8) == pytest.approx(0.0)


def test_a_pure_function_of_the_step() -> None:
    first = [learning_rate_at(s, peak=3e-3, total_steps=50, schedule="cosine") for s in range(50)]
    again = [learning_rate_at(s, peak=3e-3, total_steps=50, schedule="cosine") for s in range(50)]
    assert first == again


@pytest.mark.parametrize(
    "kwargs",
    [{"total_steps": 0}, {"min_lr_ratio": 1.5}, {"warmup_steps": -1}],
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    arguments = {"peak": 1.0, "total_steps": 10} | kwargs
    with pytest.raises(ValueError):
        learning_rate_at(0, **arguments)  # type: ignore[arg-type]
