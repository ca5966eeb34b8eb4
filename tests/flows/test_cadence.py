"""Cadence points and segments: where a run saves, hotloads and evaluates."""

from __future__ import annotations

from flows.cadence import Cadence


def _cadence(**overrides: int | bool) -> Cadence:
    fields: dict[str, int | bool] = {
        "max_steps": 20,
        "checkpoint_every": 5,
        "hotload_every": 0,
        "eval_every": 8,
        "has_deployment": True,
        "sample_eval": True,
    }
    return Cadence(**(fields | overrides))  # type: ignore[arg-type]


def test_segments_end_at_every_cadence_point() -> None:
    assert _cadence().segments(0) == [(0, 5), (5, 8), (8, 10), (10, 15), (15, 16), (16, 20)]


def test_a_resumed_run_plans_the_same_remaining_segments() -> None:
    cadence = _cadence()
    assert cadence.segments(10) == [s for s in cadence.segments(0) if s[0] >= 10]
    assert cadence.segments(20) == []


def test_checkpoints_at_the_interval_and_the_end() -> None:
    cadence = _cadence(max_steps=12)
    assert [p for p in range(13) if cadence.checkpoint_at(p)] == [5, 10, 12]


def test_evaluations_at_start_interval_and_end() -> None:
    assert [p for p in range(21) if _cadence().eval_at(p)] == [0, 8, 16, 20]
    assert [p for p in range(21) if _cadence(eval_every=0).eval_at(p)] == [0, 20]


def test_hotloads_serve_due_evaluations_the_interval_and_the_end() -> None:
    cadence = _cadence(hotload_every=10)
    assert cadence.hotload_at(8, eval_due=True)
    assert not cadence.hotload_at(8, eval_due=False)  # already evaluated: nothing to serve
    assert cadence.hotload_at(10, eval_due=False) and cadence.hotload_at(20, eval_due=False)
    assert not _cadence(has_deployment=False).hotload_at(20, eval_due=True)
    assert not _cadence(sample_eval=False).hotload_at(8, eval_due=True)
