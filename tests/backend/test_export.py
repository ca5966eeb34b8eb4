"""Exports and promotions of trained checkpoints, loaded back with plain transformers and peft.

Two tiny runs (full-parameter and LoRA) train three steps on a real local platform; their saved
states are exported and promoted, then loaded with nothing but transformers / peft, and the
per-token log-probabilities must match the trainer's own `forward` at the same weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from tinker import types
from transformers import AutoTokenizer

from backend import LocalPlatform
from backend.export import ExportError, export_checkpoint
from backend.models.store import ensure_model_dir
from sdk import (
    FiretitanServiceClient,
    FiretitanTrainingClient,
    GradAccNormalization,
    TrainerJobManager,
)
from tests.export_support import hf_model, max_gap, peft_model
from tests.trainer_support import ACCOUNT, BATCH, FAST_TIMINGS, TrainerPlatform

LORA_RANK = 4
STEPS = 3
PARITY = 1e-5  # max |logprob difference| allowed between the export and the trainer
ADAM = types.AdamParams(learning_rate=1e-2)


@dataclass(frozen=True)
class TrainedRun:
    """A job trained `STEPS` steps and saved as state `step-3`, with the trainer's logprobs."""

    job_id: str
    state_dir: Path
    logprobs: list[torch.Tensor]
    snapshot_names: dict[str, str]  # checkpoint type -> sampler snapshot name


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        data_dir = tmp_path_factory.mktemp("platform")
        with LocalPlatform(data_dir=data_dir, timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


@pytest.fixture(scope="module")
def base_dir(tp: TrainerPlatform) -> Path:
    return ensure_model_dir("tiny", tp.platform.state.models_dir)


def _train(tp: TrainerPlatform, job_id: str, lora_rank: int) -> TrainedRun:
    service = FiretitanServiceClient(tp.create_job(job_id, lora_rank=lora_rank), tp.api_key)
    with service:
        client = service.create_training_client("tiny", lora_rank=lora_rank, lora_alpha=16)
        for _ in range(STEPS):
            client.forward_backward(BATCH, "cross_entropy").result()
            client.optim_step(ADAM, GradAccNormalization.NUM_LOSS_TOKENS).result()
        client.save_state("step-3").result()
        snapshots = _sampler_saves(client, lora_rank)
        output = client.forward(BATCH, "cross_entropy").result()
    logprobs = [torch.tensor(out["logprobs"].data) for out in output.loss_fn_outputs]
    return TrainedRun(job_id, tp.state_dir(job_id, "step-3"), logprobs, snapshots)


def _sampler_saves(client: FiretitanTrainingClient, lora_rank: int) -> dict[str, str]:
    """Full runs: a base snapshot, then a delta; LoRA runs: an adapter snapshot."""
    if lora_rank:
        return {"lora": client.save_weights_for_sampler_ext("adapter", "base").snapshot_name}
    base = client.save_weights_for_sampler_ext("full", "base").snapshot_name
    delta = client.save_weights_for_sampler_ext("delta", "delta").snapshot_name
    return {"base": base, "delta": delta}


@pytest.fixture(scope="module")
def full_run(tp: TrainerPlatform) -> TrainedRun:
    return _train(tp, "export-full", 0)


@pytest.fixture(scope="module")
def lora_run(tp: TrainerPlatform) -> TrainedRun:
    return _train(tp, "export-lora", LORA_RANK)


def _plain_logprobs(model: torch.nn.Module) -> list[torch.Tensor]:
    """log p(target | prefix) for each datum of BATCH, one sequence at a time, no padding."""
    results = []
    with torch.no_grad():
        for datum in BATCH:
            tokens = torch.tensor([datum.model_input.to_ints()])
            targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].data)
            logits = model(input_ids=tokens).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            results.append(logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return results


def test_full_export_loads_with_transformers_and_matches_the_trainer(
    full_run: TrainedRun, base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "full"
    result = export_checkpoint(full_run.state_dir, base_dir, out)
    assert (result.kind, result.step) == ("full", STEPS)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert max_gap(_plain_logprobs(hf_model(out)), full_run.logprobs) <= PARITY
    # The weights really moved: the untrained base model answers differently.
    assert max_gap(_plain_logprobs(hf_model(base_dir)), full_run.logprobs) > 1e-3
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == list(b"abc")


def test_lora_export_is_a_peft_adapter_that_matches_the_trainer(
    lora_run: TrainedRun, base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    result = export_checkpoint(lora_run.state_dir, base_dir, out)
    assert result.kind == "lora"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["base_model_name_or_path"]) == (LORA_RANK, str(base_dir))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()
    assert max_gap(_plain_logprobs(peft_model(base_dir, out)), lora_run.logprobs) <= PARITY
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == list(b"abc")


def test_merged_lora_export_is_a_full_model_that_matches_the_trainer(
    lora_run: TrainedRun, base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert export_checkpoint(lora_run.state_dir, base_dir, out, merged=True).kind == "merged"
    assert not (out / "adapter_config.json").exists()
    assert max_gap(_plain_logprobs(hf_model(out)), lora_run.logprobs) <= PARITY


def test_merged_export_of_a_full_parameter_checkpoint_is_refused(
    full_run: TrainedRun, base_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="only for LoRA"):
        export_checkpoint(full_run.state_dir, base_dir, tmp_path / "out", merged=True)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [("marker", "incomplete: no COMPLETE"), ("weights", "SHA-256"), ("gone", "does not exist")],
)
def test_damaged_checkpoints_are_refused_by_name(
    lora_run: TrainedRun, base_dir: Path, tmp_path: Path, damage: str, fragment: str
) -> None:
    copy = tmp_path / "step-3"
    shutil.copytree(lora_run.state_dir, copy)
    if damage == "marker":
        (copy / "COMPLETE").unlink()
    elif damage == "weights":
        data = bytearray((copy / "weights.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (copy / "weights.safetensors").write_bytes(bytes(data))
    else:
        shutil.rmtree(copy)
    with pytest.raises(ExportError, match=fragment) as caught:
        export_checkpoint(copy, base_dir, tmp_path / "out")
    assert str(copy) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_dir_is_replaced_only_with_force(
    full_run: TrainedRun, base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(full_run.state_dir, base_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(full_run.state_dir, base_dir, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- promotion --------------------------------------------------------------------------------


def _promote(tp: TrainerPlatform, job_id: str, checkpoint: str, model_id: str) -> httpx.Response:
    body: dict[str, Any] = {
        "output_model": f"accounts/{ACCOUNT}/models/{model_id}",
        "trainer_job_id": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}",
        "base_model": "accounts/fireworks/models/tiny",
        "async_promotion": True,
    }
    return tp.http.post(f"/v1/accounts/{ACCOUNT}/checkpoints/{checkpoint}:promote", json=body)


def test_promoting_a_lora_state_lands_the_export_in_the_model_registry(
    tp: TrainerPlatform, lora_run: TrainedRun, base_dir: Path, tmp_path: Path
) -> None:
    trainers = TrainerJobManager(tp.api_key, tp.platform.base_url)
    with trainers:
        model = trainers.promote_checkpoint(
            name=f"accounts/{ACCOUNT}/rlorTrainerJobs/{lora_run.job_id}/checkpoints/step-3",
            output_model_id="lora-step-3",
            base_model="accounts/fireworks/models/tiny",
        )
    assert model["name"] == f"accounts/{ACCOUNT}/models/lora-step-3"
    assert (model["state"], model["kind"]) == ("READY", "HF_PEFT_ADDON")
    assert model["peftDetails"]["r"] == LORA_RANK
    assert model["peftDetails"]["baseModel"] == f"accounts/{ACCOUNT}/models/tiny"
    assert "q_proj" in model["peftDetails"]["targetModules"]
    promoted = tp.platform.data_dir / "promoted" / "lora-step-3"
    assert model["localPath"] == str(promoted)
    assert json.loads((promoted / "model.json").read_text())["name"] == model["name"]
    exported = tmp_path / "lora"
    export_checkpoint(lora_run.state_dir, base_dir, exported)
    promoted_weights = load_file(promoted / "adapter_model.safetensors")
    exported_weights = load_file(exported / "adapter_model.safetensors")
    assert promoted_weights.keys() == exported_weights.keys()
    assert all(torch.equal(promoted_weights[k], exported_weights[k]) for k in promoted_weights)
    assert max_gap(_plain_logprobs(peft_model(base_dir, promoted)), lora_run.logprobs) <= PARITY
    duplicate = _promote(tp, lora_run.job_id, "step-3", "lora-step-3")
    assert duplicate.status_code == 409, duplicate.text


def test_promoting_a_full_parameter_state_gives_a_loadable_base_model(
    tp: TrainerPlatform, full_run: TrainedRun
) -> None:
    response = _promote(tp, full_run.job_id, "step-3", "full-step-3")
    assert response.status_code == 200, response.text
    model = response.json()["model"]
    assert model["kind"] == "HF_BASE_MODEL" and "peftDetails" not in model
    promoted = hf_model(Path(model["localPath"]))
    assert max_gap(_plain_logprobs(promoted), full_run.logprobs) <= PARITY


def test_sampler_snapshots_promote_but_deltas_do_not(
    tp: TrainerPlatform, full_run: TrainedRun, lora_run: TrainedRun
) -> None:
    adapter = _promote(tp, lora_run.job_id, lora_run.snapshot_names["lora"], "lora-snapshot")
    assert adapter.status_code == 200, adapter.text
    assert adapter.json()["model"]["kind"] == "HF_PEFT_ADDON"
    base = _promote(tp, full_run.job_id, full_run.snapshot_names["base"], "full-snapshot")
    assert base.status_code == 200, base.text
    promoted = hf_model(Path(base.json()["model"]["localPath"]))
    assert max_gap(_plain_logprobs(promoted), full_run.logprobs) <= PARITY
    delta = _promote(tp, full_run.job_id, full_run.snapshot_names["delta"], "full-delta")
    assert delta.status_code == 400, delta.text
    assert "not promotable" in delta.json()["error"]["message"]
    assert not (tp.platform.data_dir / "promoted" / "full-delta").exists()


@pytest.mark.parametrize(
    ("checkpoint", "change", "status", "fragment"),
    [
        ("step-9", {}, 404, "its checkpoints: step-3"),
        ("step-3", {"output_model": "accounts/local/models/Bad_Name"}, 400, "output_model"),
        ("step-3", {"output_model": "accounts/other/models/x"}, 400, "output_model"),
        ("step-3", {"trainer_job_id": "accounts/local/rlorTrainerJobs/nope"}, 404, "nope"),
        ("step-3", {"base_model": "smollm2-135m"}, 400, "not the job's base model"),
        ("step-3", {"outputModel": "accounts/local/models/x"}, 400, "outputModel"),
    ],
)
def test_bad_promote_requests_are_refused_with_the_reason(
    tp: TrainerPlatform,
    lora_run: TrainedRun,
    checkpoint: str,
    change: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    body = {
        "output_model": f"accounts/{ACCOUNT}/models/refused",
        "trainer_job_id": f"accounts/{ACCOUNT}/rlorTrainerJobs/{lora_run.job_id}",
    } | change
    url = f"/v1/accounts/{ACCOUNT}/checkpoints/{checkpoint}:promote"
    response = tp.http.post(url, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.text
    assert not (tp.platform.data_dir / "promoted" / "refused").exists()
