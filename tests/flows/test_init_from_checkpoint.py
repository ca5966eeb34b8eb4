"""`init_from_checkpoint`: a run starts from another run's checkpoint, weights and optimizer.

A second run initialised from the first one's final checkpoint evaluates, before its first step,
exactly as the first one did after its last: the same weights. Its own step and data cursor
start at 0. Once it has saved checkpoints of its own, a preemption resumes from those, not from
the hand-off, and the result equals an uninterrupted run bit for bit. A checkpoint the source
job does not have is refused with the field named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backend import LocalPlatform
from flows.config import SFTConfig
from flows.ledger import CheckpointRow, EvaluationRow, read_ledger
from flows.sft import configured_sft_flow, run_sft
from sdk import ConfigError
from tests.flows.conftest import sft_config
from tests.flows.support import assert_bitwise_equal, final_state, jsonl, read_run

pytestmark = pytest.mark.usefixtures("prefect_server")

PHASE_TWO_STEPS = 6


@pytest.fixture(scope="module")
def phase_one(platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory) -> SFTConfig:
    config = sft_config(platform, tmp_path_factory.mktemp("runs") / "phase-one", max_steps=10)
    assert run_sft(config).steps_done == 10
    return config


def _evaluations(config: SFTConfig) -> dict[int, dict[str, float]]:
    rows = read_ledger(config.resolved_run_dir)
    return {row.step: row.metrics for row in rows if isinstance(row, EvaluationRow)}


def _source(config: SFTConfig) -> str:
    rows = [r for r in read_ledger(config.resolved_run_dir) if isinstance(r, CheckpointRow)]
    assert rows[-1].job_id is not None
    return f"{rows[-1].job_id}:{rows[-1].name}"


def _phase_two(platform: LocalPlatform, run_dir: Path, source: str, **overrides: Any) -> SFTConfig:
    return sft_config(
        platform,
        run_dir,
        max_steps=PHASE_TWO_STEPS,
        checkpoint_every=3,
        init_from_checkpoint=source,
        **overrides,
    )


def test_a_run_starts_from_another_runs_checkpoint(
    platform: LocalPlatform, phase_one: SFTConfig, tmp_path: Path
) -> None:
    config = _phase_two(platform, tmp_path / "phase-two", _source(phase_one))
    assert run_sft(config).steps_done == PHASE_TWO_STEPS
    # Before its first step the new run holds the first run's final weights, exactly.
    assert _evaluations(config)[0] == _evaluations(phase_one)[10]
    checkpoints = [r for r in read_ledger(config.resolved_run_dir) if isinstance(r, CheckpointRow)]
    assert [(c.next_step, c.data_cursor) for c in checkpoints] == [(3, 48), (6, 96)]
    first_rows = jsonl(Path(config.resolved_run_dir) / "metrics.jsonl")[0]["row_indices"]
    assert first_rows == jsonl(Path(phase_one.resolved_run_dir) / "metrics.jsonl")[0]["row_indices"]


def test_after_its_own_checkpoint_a_preempted_run_resumes_from_it_not_the_hand_off(
    platform: LocalPlatform, phase_one: SFTConfig, tmp_path: Path
) -> None:
    source = _source(phase_one)
    straight = _phase_two(platform, tmp_path / "straight", source)
    assert run_sft(straight).steps_done == PHASE_TWO_STEPS
    preempted = _phase_two(platform, tmp_path / "preempted", source, flow_retries=2)
    # The job's step count continues from the loaded state's (10): 15 is the new run's 5th step,
    # after its own step-3 checkpoint.
    platform.schedule_preemption([15])
    state = configured_sft_flow(preempted)(preempted, return_state=True)
    assert state.is_completed(), state.message
    record = read_run(state)
    assert record.run_count == 2
    assert "resumed from step-3" in record.logs
    assert [m["step"] for m in jsonl(Path(preempted.resolved_run_dir) / "metrics.jsonl")] == list(
        range(PHASE_TWO_STEPS)
    )
    assert_bitwise_equal(
        final_state(platform, Path(straight.resolved_run_dir), PHASE_TWO_STEPS),
        final_state(platform, Path(preempted.resolved_run_dir), PHASE_TWO_STEPS),
    )


def test_a_checkpoint_the_source_job_lacks_is_refused_with_the_field_named(
    platform: LocalPlatform, phase_one: SFTConfig, tmp_path: Path
) -> None:
    job = _source(phase_one).split(":")[0]
    config = _phase_two(platform, tmp_path / "missing", f"{job}:step-999", flow_retries=0)
    with pytest.raises(ConfigError, match=rf"init_from_checkpoint: trainer job {job} has no "):
        run_sft(config)
    assert not any(isinstance(r, CheckpointRow) for r in read_ledger(config.resolved_run_dir))


def test_a_malformed_reference_is_refused_by_the_config(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="init_from_checkpoint"):
        SFTConfig(init_from_checkpoint="no spaces: allowed")


def test_dpo_refuses_a_start_its_reference_would_not_match() -> None:
    from flows.config import DPOConfig, ORPOConfig

    with pytest.raises(ValidationError, match="init_from_checkpoint is not supported for DPO"):
        DPOConfig(init_from_checkpoint="some-job:step-10")
    assert ORPOConfig(init_from_checkpoint="some-job:step-10").init_from_checkpoint  # no reference
