"""Preemption recovery through flow retries, compared with an uninterrupted run (torchtune style).

The reference run trains 20 steps straight. The recovered run is preempted four times: after
optimizer steps 3 and 12, after step 10 (right before its state save), and in the middle of
the step-15 save (files written, the save never answered). Each time the flow fails with a
`TrainerLostError`, Prefect retries it, provisioning reconnects to the same job, the ledger's
last checkpoint is loaded with its optimizer state, and the data cursor resumes. Losses per
step, row indices per step and the final weights and optimizer state must equal the reference
run's bit for bit. A run under 10 % injected transient faults must equal it too: no step was
applied twice.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from algorithms.datasets import epoch_order
from algorithms.toy_tasks import TOY_TASKS
from backend import LocalPlatform
from flows.config import SFTConfig, WandbConfig
from flows.ledger import CheckpointRow, HotloadRow, RunEndRow, read_ledger
from flows.sft import configured_sft_flow
from tests.flows.conftest import sft_config, state_files
from tests.flows.support import files_text, jsonl, preempt_during_save, read_run

pytestmark = pytest.mark.usefixtures("prefect_server")

BATCH = 16
STEPS = 20


def _config(platform: LocalPlatform, run_dir: Path, **overrides: Any) -> SFTConfig:
    return sft_config(
        platform, run_dir, batch_size=BATCH, max_steps=STEPS, hotload_every=5, **overrides
    )


@pytest.fixture(scope="module")
def reference(platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory) -> SFTConfig:
    """The uninterrupted run every recovered run is compared with."""
    config = _config(platform, tmp_path_factory.mktemp("runs") / "straight")
    state = configured_sft_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message
    return config


def _job_id(run_dir: Path) -> str:
    rows = [row for row in read_ledger(run_dir) if isinstance(row, CheckpointRow)]
    assert rows[-1].job_id is not None
    return rows[-1].job_id


def _assert_same_training(platform: LocalPlatform, reference: SFTConfig, run_dir: Path) -> None:
    """Per-step losses and rows, and the final weights and optimizer state: bit for bit."""
    expected = jsonl(Path(reference.resolved_run_dir) / "metrics.jsonl")
    actual = jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in actual] == list(range(STEPS))
    assert [m["train/ce_loss"] for m in actual] == [m["train/ce_loss"] for m in expected]
    assert [m["row_indices"] for m in actual] == [m["row_indices"] for m in expected]
    reference_job = _job_id(Path(reference.resolved_run_dir))
    for part in ("weights.safetensors", "optimizer.safetensors"):
        want = load_file(state_files(platform, reference_job, f"step-{STEPS}") / part)
        got = load_file(state_files(platform, _job_id(run_dir), f"step-{STEPS}") / part)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[name], got[name]) for name in want), part


def test_preempted_run_resumes_to_the_uninterrupted_result(
    platform: LocalPlatform,
    reference: SFTConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_dir = tmp_path / "preempted"
    config = _config(platform, run_dir, flow_retries=4, wandb=WandbConfig(project="fireloop-tests"))
    before = platform.fault_stats.preemptions
    platform.schedule_preemption([3, 10, 12])
    fired = preempt_during_save(platform, "step-15", monkeypatch)
    with caplog.at_level(logging.INFO):
        state = configured_sft_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message
    assert fired, "the step-15 save was never interrupted"
    assert platform.fault_stats.preemptions - before == 4
    record = read_run(state)
    assert record.run_count == 5  # four failed attempts, each retried by Prefect
    assert record.logs.count("TrainerLostError") >= 4

    _assert_same_training(platform, reference, run_dir)

    rows = read_ledger(run_dir)
    checkpoints = [row for row in rows if isinstance(row, CheckpointRow)]
    # The save cut short left `step-15` on the job without a ledger row: the replay saved
    # `step-15-a1` (names are never overwritten), and every row's cursor is its rows consumed.
    assert [(c.name, c.next_step, c.data_cursor) for c in checkpoints] == [
        ("step-5", 5, 5 * BATCH),
        ("step-10", 10, 10 * BATCH),
        ("step-15-a1", 15, 15 * BATCH),
        ("step-20", 20, 20 * BATCH),
    ]
    assert isinstance(rows[-1], RunEndRow)
    # Every cursor equals the rows the steps before it actually trained on, and those rows are
    # the seeded order's first ones, each exactly once: none replayed, none skipped.
    trained = [m["row_indices"] for m in jsonl(run_dir / "metrics.jsonl")]
    for checkpoint in checkpoints:
        assert checkpoint.data_cursor == sum(map(len, trained[: checkpoint.next_step]))
    flat = [row for rows_of_step in trained for row in rows_of_step]
    n_rows = TOY_TASKS["reverse"].default_rows["train"]
    assert flat == epoch_order(config.seed, 0, n_rows)[: STEPS * BATCH]
    # Each attempt's training client has its own snapshot suffix; its first hotload is `base`.
    hotloads = [row for row in rows if isinstance(row, HotloadRow)]
    sessions: dict[str, list[str | None]] = {}
    for hotload in hotloads:
        suffix = hotload.identity.rsplit("-", 1)[-1]
        sessions.setdefault(suffix, []).append(hotload.checkpoint_type)
    assert all(kinds[0] == "base" for kinds in sessions.values()), sessions
    assert len(sessions) >= 3 and all(h.verified for h in hotloads)

    # One W&B run across all attempts: the id comes from the flow run, kept by Prefect retries.
    wandb_ids = {c.wandb_run_id for c in checkpoints}
    assert len(wandb_ids) == 1 and None not in wandb_ids
    wandb_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # `offline-run-<time>-<run id>`; W&B appends `-<n>` when two attempts start in one second.
    (wandb_id,) = wandb_ids
    named = [re.sub(r"^offline-run-[0-9_]+-", "", d.name) for d in wandb_dirs]
    assert named and all(re.fullmatch(rf"{re.escape(wandb_id)}(-[0-9]+)?", n) for n in named), named

    key = platform.api_key
    places = {
        "captured logs": caplog.text,
        "Prefect logs": record.logs,
        "artifacts": str(record.artifacts),
        "flow run parameters": str(record.flow_run.parameters),
        "state message": state.message or "",
        "run_dir (ledger, metrics, W&B)": files_text(run_dir),
    }
    for where, text in places.items():
        assert key not in text, f"the API key leaked into {where}"
    assert "lost during" in record.logs  # the logs were really searched


def test_transient_faults_never_apply_a_step_twice(
    platform: LocalPlatform, reference: SFTConfig, tmp_path: Path
) -> None:
    run_dir = tmp_path / "faulty"
    config = _config(platform, run_dir, flow_retries=4)
    before = platform.fault_stats
    platform.inject_faults(rate=0.1, seed=7)
    try:
        state = configured_sft_flow(config)(config, return_state=True)
    finally:
        platform.clear_faults()
    assert state.is_completed(), state.message
    stats = platform.fault_stats
    assert stats.dropped > before.dropped and stats.unavailable > before.unavailable
    # Dropped answers were retried with the same sequence ids: each step ran exactly once.
    _assert_same_training(platform, reference, run_dir)
