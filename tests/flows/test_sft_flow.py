"""The SFT flow end to end on the embedded platform: it learns, serves what it learned, reports.

One run of 100 steps on the reversal task: the tiny model goes from no exact match to a
clear share of held-out words, evaluated by greedy sampling from the deployment after a
verified hotload. The same run is then checked for everything it reports (ledger, artifacts,
W&B files, the CLI's progress hook) and for the API key, which must appear nowhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import SFTConfig, WandbConfig
from flows.embedded import embedded_lease
from flows.ledger import CheckpointRow, EvaluationRow, HotloadRow, RunEndRow, read_ledger
from flows.monitoring import Progress, progress_listener
from flows.sft import configured_sft_flow, run_sft
from tests.flows.support import files_text, jsonl, read_run

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_sft_learns_the_reversal_task_and_serves_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "reverse"
    config = SFTConfig(
        run_name="reverse",
        run_dir=str(run_dir),
        max_steps=100,
        batch_size=64,
        checkpoint_every=50,
        eval_every=50,
        eval_size=32,
        retry_delay_s=0,
        wandb=WandbConfig(project="fireloop-tests"),
    )
    seen: list[Progress] = []
    # The platform is held across the run, so the key searched for below is the one it used.
    with embedded_lease(run_dir / "platform") as held, progress_listener(seen.append):
        state = configured_sft_flow(config)(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    rows = read_ledger(run_dir)
    evaluations = {row.step: row.metrics for row in rows if isinstance(row, EvaluationRow)}
    assert sorted(evaluations) == [0, 50, 100]
    before, after = evaluations[0], evaluations[100]
    assert before["eval/exact_match"] <= 0.1
    assert after["eval/exact_match"] >= max(0.25, before["eval/exact_match"] + 0.2), evaluations
    assert after["eval/loss"] < before["eval/loss"] / 3

    # Every evaluation sampled verified weights: a hotload row at its step, base first.
    hotloads = [row for row in rows if isinstance(row, HotloadRow)]
    assert [(h.step, h.checkpoint_type, h.verified) for h in hotloads] == [
        (0, "base", True),
        (50, "delta", True),
        (100, "delta", True),
    ]
    checkpoints = [row for row in rows if isinstance(row, CheckpointRow)]
    assert [(c.name, c.next_step, c.data_cursor) for c in checkpoints] == [
        ("step-50", 50, 50 * 64),
        ("step-100", 100, 100 * 64),
    ]
    assert checkpoints[-1].snapshot_identity == hotloads[-1].identity
    assert isinstance(rows[-1], RunEndRow)

    assert result.steps_done == 100 and result.data_cursor == 100 * 64
    assert result.last_checkpoint == "step-100"
    assert result.served_snapshot == hotloads[-1].identity
    assert result.final_metrics["eval/exact_match"] == after["eval/exact_match"]
    assert result.ledger_path == str(run_dir / "ledger.jsonl")
    # Where to find what the run made, and the truth about the embedded platform's resources.
    assert not result.already_complete and result.platform == "embedded"
    assert result.metrics_path == str(run_dir / "metrics.jsonl")
    assert result.wandb_dir == str(run_dir / "wandb")
    assert result.platform_data_dir == str(run_dir / "platform")
    assert result.checkpoint_dir is not None
    assert (Path(result.checkpoint_dir) / "step-100").is_dir()
    assert (result.trainer_after, result.deployment_after) == ("stops_with_process",) * 2
    assert [p.step for p in seen] == list(range(100))

    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(100))
    assert metrics[-1]["train/ce_loss"] < metrics[0]["train/ce_loss"] / 3

    record = read_run(state)
    assert record.artifact("-progress")["data"] == 100.0
    segments = json.loads(record.artifact("-segments")["data"])
    assert [(row["steps"], row["checkpoint"]) for row in segments] == [
        ("0-49", "step-50"),
        ("50-99", "step-100"),
    ]
    ledger_report = record.artifact("-ledger")["data"]
    assert "step-100" in ledger_report and hotloads[-1].identity in ledger_report

    wandb_dirs = list((run_dir / "wandb").glob(f"offline-run-*-{result.wandb_run_id}"))
    assert len(wandb_dirs) == 1, list((run_dir / "wandb").iterdir())
    wandb_text = files_text(wandb_dirs[0])
    assert "train/ce_loss" in wandb_text and "max_steps" in wandb_text

    key = held.api_key.get_secret_value()
    for where, text in {
        "logs": record.logs,
        "artifacts": str(record.artifacts),
        "parameters": str(record.flow_run.parameters),
        "run_dir": files_text(run_dir / "wandb") + files_text_of(run_dir),
    }.items():
        assert key not in text, f"the API key leaked into {where}"

    # A finished run is not redone: the same config returns its result from the ledger.
    ledger_bytes = (run_dir / "ledger.jsonl").read_bytes()
    again = run_sft(config)
    assert (again.steps_done, again.last_checkpoint, again.served_snapshot) == (
        100,
        "step-100",
        result.served_snapshot,
    )
    assert (run_dir / "ledger.jsonl").read_bytes() == ledger_bytes
    assert again.already_complete


def files_text_of(run_dir: Path) -> str:
    """The run's own files (ledger, metrics), not the embedded platform's data directory."""
    return "\n".join(
        (run_dir / name).read_text(encoding="utf-8") for name in ("ledger.jsonl", "metrics.jsonl")
    )
