"""`fireloop export` on run directories: a real SFT run's, and small ones built for the errors.

The LoRA run is a real `fireloop run sft` in a subprocess (three steps of the tiny model); the
export runs as a subprocess too and is loaded with plain peft / transformers, whose per-token
log-probabilities must match the trainer engine's `forward` on the same checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backend.models.store import ensure_model_dir, resolve_models_dir
from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel
from backend.trainer.state import read_state
from fireloop.cli import app
from flows.ledger import Ledger, RunHeader
from tests.export_support import hf_model, max_gap, peft_model

PARITY = 1e-5
FIREFLOOP = [sys.executable, "-m", "fireloop.cli"]
WORDS = ("abc", "dcab", "bad", "cabd")


def _fireloop(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"WANDB_SILENT": "true", "DO_NOT_TRACK": "1"}
    return subprocess.run(
        [*FIREFLOOP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished LoRA SFT run: checkpoints step-2 and step-3 in its ledger."""
    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "lora"
    settings = {
        "run_name": "lora",
        "run_dir": str(run_dir),
        "max_steps": "3",
        "checkpoint_every": "2",
        "lora_rank": "4",
        "dataset": "reverse",
        "batch_size": "8",
        "eval_every": "0",
        "sample_eval": "false",
        "flow_retries": "0",
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    done = _fireloop("run", "sft", *sets, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-parameter run directory as a flow leaves it: ledger row, state in `platform/`."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    job = "full-trainer"
    model = TrainableModel(_base_dir(), base_model="tiny")
    model.save_state(run_dir / "platform" / "jobs" / job / "checkpoints" / "step-1")
    identity = {
        "config_hash": "sha256:0",
        "base_model": "fireloop/tiny",
        "tokenizer_model": "fireloop/tiny",
        "lora_rank": 0,
        "dataset_fingerprint": "sha256:1",
    }
    ledger = Ledger.open(run_dir, RunHeader(run_id="full", recipe="sft", **identity))
    ledger.append_checkpoint(
        name="step-1", step=0, data_cursor=8, epoch=0, state_path="step-1", job_id=job
    )
    return run_dir


def _base_dir() -> Path:
    return ensure_model_dir("tiny", resolve_models_dir())


def _state_dir(run_dir: Path, name: str) -> Path:
    (found,) = (run_dir / "platform" / "jobs").glob(f"*/checkpoints/{name}")
    return found


def _datums() -> list[Datum]:
    datums = []
    for word in WORDS:
        tokens = [*word.encode(), ord("="), *word[::-1].encode()]
        targets = torch.tensor([*tokens[1:], 258])
        datums.append(Datum(tokens, {"target_tokens": targets, "weights": torch.ones(len(tokens))}))
    return datums


def _trainer_logprobs(state_dir: Path) -> list[torch.Tensor]:
    """The trainer engine's `forward` at the checkpoint's weights."""
    lora = read_state(state_dir, with_optimizer=False).meta.lora
    model = TrainableModel(_base_dir(), base_model="tiny", lora=lora)
    model.load_state(state_dir, with_optimizer=False)
    return model.forward(_datums(), "cross_entropy", None).logprobs


def _plain_logprobs(model: torch.nn.Module) -> list[torch.Tensor]:
    results = []
    with torch.no_grad():
        for datum in _datums():
            logits = model(input_ids=torch.tensor([datum.tokens])).logits[0].float()
            targets = datum.loss_fn_inputs["target_tokens"].unsqueeze(-1)
            results.append(torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1))
    return results


def test_cli_exports_the_newest_lora_checkpoint_as_a_peft_adapter(
    lora_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    done = _fireloop("export", str(lora_run), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PEFT adapter" in done.stdout and "step 3" in done.stdout
    assert "Loading weights" not in done.stdout + done.stderr  # no download-style bars
    adapter = peft_model(_base_dir(), out)
    expected = _trainer_logprobs(_state_dir(lora_run, "step-3"))
    assert max_gap(_plain_logprobs(adapter), expected) <= PARITY


def test_cli_exports_an_earlier_step_merged(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["export", str(lora_run), "--step", "2", "--out", str(out), "--merged"]
    )
    assert result.exit_code == 0, result.output
    assert "LoRA merged" in result.output
    expected = _trainer_logprobs(_state_dir(lora_run, "step-2"))
    assert max_gap(_plain_logprobs(hf_model(out)), expected) <= PARITY


def test_cli_exports_a_full_parameter_run_as_a_model_directory(
    full_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(full_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = _trainer_logprobs(_state_dir(full_run, "step-1"))
    assert max_gap(_plain_logprobs(hf_model(out)), expected) <= PARITY


def test_cli_finds_checkpoints_of_a_standalone_backend_with_data_dir(
    full_run: Path, tmp_path: Path
) -> None:
    """A run against `fireloop backend` keeps only its ledger; the checkpoints are elsewhere."""
    run_dir, backend_data = tmp_path / "run", tmp_path / "backend-data"
    run_dir.mkdir()
    shutil.copy(full_run / "ledger.jsonl", run_dir)
    shutil.copytree(full_run / "platform", backend_data)
    out = tmp_path / "model"
    args = ["export", str(run_dir), "--out", str(out)]
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "--data-dir" in missing.output, missing.output
    result = CliRunner().invoke(app, [*args, "--data-dir", str(backend_data)])
    assert result.exit_code == 0, result.output
    expected = _trainer_logprobs(_state_dir(full_run, "step-1"))
    assert max_gap(_plain_logprobs(hf_model(out)), expected) <= PARITY


def _break_copy(run_dir: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    state = _state_dir(copy, "step-1")
    if how == "gone":
        shutil.rmtree(state)
    else:
        (state / "COMPLETE").unlink()
    return copy


@pytest.mark.parametrize(
    ("case", "args", "fragment"),
    [
        ("no ledger", [], "not a run directory: it has no ledger.jsonl"),
        ("corrupt ledger", [], "ledger.jsonl cannot be read"),
        ("no such step", ["--step", "7"], "no checkpoint at step 7; it has steps 1"),
        ("files gone", [], "is gone"),
        ("incomplete", [], "incomplete: no COMPLETE marker"),
        ("merged full", ["--merged"], "--merged is only for LoRA"),
        ("out not empty", [], "not empty; pass --force"),
    ],
)
def test_cli_errors_are_one_clear_message(
    full_run: Path, tmp_path: Path, case: str, args: list[str], fragment: str
) -> None:
    run_dir, out = full_run, tmp_path / "out"
    if case == "no ledger":
        run_dir = tmp_path
    elif case == "corrupt ledger":
        run_dir = tmp_path / "run"
        shutil.copytree(full_run, run_dir)
        lines = (run_dir / "ledger.jsonl").read_text().splitlines()
        (run_dir / "ledger.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    elif case == "files gone":
        run_dir = _break_copy(full_run, tmp_path, "gone")
    elif case == "incomplete":
        run_dir = _break_copy(full_run, tmp_path, "marker")
    elif case == "out not empty":
        out.mkdir()
        (out / "keep").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists() or (out / "keep").read_text() == "mine"
