"""ORPO end to end on the local platform: it learns `reverse_pairs`, recovers bit for bit, and
refuses bad input before any trainer exists.

The learning run trains the tiny model on the toy pairs and evaluates on held-out words (a word's
split is fixed by its hash): preference accuracy must reach 0.9 with a positive mean log-odds
ratio. The recovery run is preempted three times, once in the middle of a save, and must end with
the same per-step losses, weights and optimizer state as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from algorithms.datasets import DatasetError
from backend import LocalPlatform
from flows.config import ORPOConfig
from flows.embedded import local_model_facts
from flows.ledger import CheckpointRow, EvaluationRow, RunEndRow, read_ledger
from flows.orpo import configured_orpo_flow, run_orpo
from tests.flows.conftest import FAST_WAITS, platform_config
from tests.flows.support import (
    assert_bitwise_equal,
    final_state,
    jsonl,
    preempt_during_save,
    read_run,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

RECOVERY_STEPS = 9
# The smallest run that reached 0.9 held-out accuracy with margin to spare (0.94 at step 74,
# 0.97 at step 111 when measured); about 30 s on a 2-core CPU.
LEARN_STEPS, LEARN_BATCH, LEARN_LR = 100, 64, 3e-3


def _config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> ORPOConfig:
    fields: dict[str, Any] = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "max_steps": RECOVERY_STEPS,
        "batch_size": 4,
        "checkpoint_every": 3,
        "eval_every": 0,
        "eval_size": 8,
        "retry_delay_s": 0,
        "waits": FAST_WAITS,
        "platform": platform_config(platform),
    }
    return ORPOConfig(**(fields | overrides))


def test_orpo_learns_to_prefer_the_right_reversal(platform: LocalPlatform, tmp_path: Path) -> None:
    run_dir = tmp_path / "orpo-learns"
    config = _config(
        platform,
        run_dir,
        max_steps=LEARN_STEPS,
        batch_size=LEARN_BATCH,
        learning_rate=LEARN_LR,
        checkpoint_every=LEARN_STEPS,
        eval_every=LEARN_STEPS // 2,
        eval_size=64,
    )
    result = run_orpo(config)
    evaluations = [r for r in read_ledger(run_dir) if isinstance(r, EvaluationRow)]
    assert [e.step for e in evaluations] == [0, LEARN_STEPS // 2, LEARN_STEPS]
    before, after = evaluations[0].metrics, evaluations[-1].metrics
    assert before["eval/accuracy"] < 0.7  # an untrained model guesses
    assert after["eval/accuracy"] >= 0.9, after
    assert after["eval/log_odds_ratio"] > 0 and after["eval/orpo_loss"] < before["eval/orpo_loss"]
    assert after["eval/batch_pairs"] == 64
    steps = jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in steps] == list(range(LEARN_STEPS))
    assert {"train/orpo_loss", "train/sft_loss", "train/or_loss", "train/accuracy"} <= set(steps[0])
    assert result.final_metrics["eval/accuracy"] == after["eval/accuracy"]


def test_a_preempted_orpo_run_equals_an_uninterrupted_one(
    platform: LocalPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _config(platform, tmp_path / "orpo-straight")
    assert configured_orpo_flow(straight)(straight).steps_done == RECOVERY_STEPS

    run_dir = tmp_path / "orpo-preempted"
    config = _config(platform, run_dir, flow_retries=4)
    platform.schedule_preemption([2, 5])
    fired = preempt_during_save(platform, "step-6", monkeypatch)
    state = configured_orpo_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message
    assert fired and read_run(state).run_count == 4  # three lost trainers, each retried

    want = jsonl(tmp_path / "orpo-straight" / "metrics.jsonl")
    got = jsonl(run_dir / "metrics.jsonl")
    for key in ("train/orpo_loss", "row_indices", "data_cursor"):
        assert [m[key] for m in got] == [m[key] for m in want], key
    rows = read_ledger(run_dir)
    checkpoints = [r for r in rows if isinstance(r, CheckpointRow)]
    # The save cut short left `step-6` without a row: the replay saved `step-6-a1`.
    assert [(c.name, c.data_cursor) for c in checkpoints] == [
        ("step-3", 12),
        ("step-6-a1", 24),
        ("step-9", 36),
    ]
    assert isinstance(rows[-1], RunEndRow)
    assert_bitwise_equal(
        final_state(platform, tmp_path / "orpo-straight", RECOVERY_STEPS),
        final_state(platform, run_dir, RECOVERY_STEPS),
    )


def _tiny_tokenizer() -> str:
    facts = local_model_facts("fireloop/tiny")
    assert facts is not None
    return facts.tokenizer_dir


def _jobs(platform: LocalPlatform) -> set[Path]:
    jobs = platform.data_dir / "jobs"
    return set(jobs.iterdir()) if jobs.exists() else set()


def test_a_pair_longer_than_the_context_is_named_before_any_trainer(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    data = tmp_path / "pairs.jsonl"
    good = {"chosen": {"text": "ab=ba"}, "rejected": {"text": "ab=ab"}}
    long = {"chosen": {"text": "ab=" + "ab " * 4000}, "rejected": {"text": "ab=ba"}}
    data.write_text("\n".join(json.dumps(row) for row in (good, long)) + "\n", encoding="utf-8")
    run_dir = tmp_path / "orpo-long"
    # The tokenizer is known before provisioning, so the pairs are checked before any trainer.
    config = _config(
        platform, run_dir, dataset=str(data), tokenizer_model=_tiny_tokenizer(), flow_retries=0
    )
    jobs_before = _jobs(platform)
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:2: \(pair\): the chosen side has \d+"):
        run_orpo(config)
    assert not run_dir.exists()  # failed before the ledger was opened
    assert _jobs(platform) == jobs_before  # and before any trainer existed


def test_a_negative_lambda_is_refused_by_the_config() -> None:
    with pytest.raises(ValidationError, match="orpo_lambda"):
        ORPOConfig(orpo_lambda=-0.5)
    with pytest.raises(ValidationError, match="dataset"):
        ORPOConfig(dataset=" ")
