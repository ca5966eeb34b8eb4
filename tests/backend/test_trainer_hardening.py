"""The trainer against hostile or careless requests, over HTTP on a real local platform.

Loads and saves that try to leave the data directory, absurd optimizer hyper-parameters, LoRA
ranks and seeds the model cannot take, a full disk, and a checkpoint overwrite cut short. Each
refusal is a user-category error naming what was wrong, and the weights are checked bitwise
(through saved states) to be as they were.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tinker import types

from backend import LocalPlatform
from backend.models.registry import REGISTERED_MODELS, max_lora_rank
from sdk import BadRequestError, FiretitanServiceClient
from tasks.errors import is_lost_trainer_symptom
from tests.backend.test_tinker_gateway import RawTinker, _raw_batch
from tests.trainer_support import ACCOUNT, BATCH, FAST_TIMINGS, TrainerPlatform

WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerPlatform]:
    data_dir = tmp_path_factory.mktemp("platform")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(data_dir=data_dir, timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


class Trainer:
    """One raw tinker session on a fresh job, with a seq-id counter."""

    def __init__(self, tp: TrainerPlatform, job_id: str, lora_rank: int = 0) -> None:
        tp.create_job(job_id, lora_rank=lora_rank)
        self.tp, self.job_id = tp, job_id
        self.raw = RawTinker(tp, job_id)
        body: dict[str, Any] = {
            "session_id": self.raw.session_id,
            "model_seq_id": 0,
            "base_model": "tiny",
        }
        if lora_rank:
            body["lora_config"] = {"rank": lora_rank}
        self.model_id: str = self.raw.result(self.raw.post("create_model", body)["request_id"])[
            "model_id"
        ]
        self.seq = 0

    def call(self, route: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        # json.dumps, not httpx's encoder: it writes Infinity and NaN (JSON extensions that
        # Python clients send and servers read back) instead of refusing them.
        body = json.dumps({"model_id": self.model_id, "seq_id": self.seq, **fields})
        response = self.raw.http.post(
            f"/{route}", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
        return self.raw.result(response.json()["request_id"])

    def train_step(self) -> None:
        assert "error" not in self.call("forward_backward", **_raw_batch())
        assert "error" not in self.call("optim_step", adam_params={"learning_rate": 1e-2})

    def saved(self, name: str) -> tuple[bytes, bytes]:
        """Save a state now; its weights and optimizer files, byte for byte."""
        assert "error" not in self.call("save_weights", path=name)
        directory = self.tp.state_dir(self.job_id, name)
        return (directory / WEIGHTS).read_bytes(), (directory / OPTIMIZER).read_bytes()


def _user_error(answer: dict[str, Any], *fragments: str) -> str:
    assert answer.get("category") == "user", answer
    message: str = answer["error"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------- optimizer hyper-parameters


@pytest.mark.parametrize(
    ("adam_params", "field"),
    [
        ({"learning_rate": float("inf")}, "adam_params.learning_rate"),
        ({"learning_rate": float("nan")}, "adam_params.learning_rate"),
        ({"learning_rate": -1e-3}, "adam_params.learning_rate"),
        ({"learning_rate": 11.0}, "adam_params.learning_rate"),
        ({"weight_decay": float("-inf")}, "adam_params.weight_decay"),
        ({"weight_decay": 5.0}, "adam_params.weight_decay"),
        ({"beta1": 1.0}, "adam_params.beta1"),
        ({"beta2": -0.1}, "adam_params.beta2"),
        ({"eps": 0.0}, "adam_params.eps"),
        ({"eps": float("nan")}, "adam_params.eps"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else value,
)
def test_absurd_hyper_parameters_are_refused_naming_the_field(
    tp: TrainerPlatform, adam_params: dict[str, float], field: str
) -> None:
    job_id = "adam-" + field.rsplit(".", 1)[1].replace("_", "-") + f"-{abs(hash(str(adam_params)))}"
    trainer = Trainer(tp, job_id[:60])
    trainer.train_step()
    assert "error" not in trainer.call("forward_backward", **_raw_batch())
    before = trainer.saved("before")
    _user_error(trainer.call("optim_step", adam_params=adam_params), field)
    assert trainer.saved("after") == before  # weights and optimizer state, bitwise
    # The refused request left the gradients in place: a valid step applies them.
    assert "error" not in trainer.call("optim_step", adam_params={"learning_rate": 1e-2})
    assert trainer.saved("stepped")[0] != before[0]


# ---------------------------------------------------------------- loads stay inside


def test_loads_outside_the_data_dir_are_refused_alike_whether_or_not_they_exist(
    tp: TrainerPlatform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    trainer = Trainer(tp, "contain")
    trainer.train_step()
    data_dir = tp.platform.data_dir
    outside = tmp_path_factory.mktemp("outside")  # a sibling of the data directory
    (outside / "state.json").write_text("{}")
    checkpoints = data_dir / "jobs" / "contain" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "escape").symlink_to(outside, target_is_directory=True)
    refs = {
        "existing outside": str(outside),
        "missing outside": str(outside / "no-such-checkpoint"),
        "dot-dot escape": f"{data_dir}/jobs/../../{outside.name}",
        "symlink escape": str(checkpoints / "escape"),
    }
    before = trainer.saved("before")
    messages = {}
    for case, ref in refs.items():
        message = _user_error(trainer.call("load_weights", path=ref), "outside")
        messages[case] = message.replace(repr(ref), "<ref>")
    assert len(set(messages.values())) == 1, messages
    # The same through a checkpoint name that is a symlink, and for a save through it.
    _user_error(trainer.call("load_weights", path="escape"), "outside")
    _user_error(trainer.call("save_weights", path="escape"), "outside")
    assert _names(outside) == ["state.json"]
    assert trainer.saved("after") == before


# ---------------------------------------------------------------- LoRA rank and seed


def test_the_registry_limit_is_the_built_models_config(tp: TrainerPlatform) -> None:
    from backend.models.store import ensure_model_dir

    for name in ("tiny", "tiny-chatml"):
        config = json.loads(
            (ensure_model_dir(name, tp.platform.models_dir) / "config.json").read_text()
        )
        assert REGISTERED_MODELS[name].max_lora_rank == max_lora_rank(config) == 64


def test_a_lora_rank_beyond_the_model_is_refused_by_the_control_plane(tp: TrainerPlatform) -> None:
    response = tp.http.post(
        f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs",
        params={"rlorTrainerJobId": "huge-rank"},
        json={"trainingConfig": {"baseModel": "tiny", "loraRank": 100_000}},
    )
    assert response.status_code == 400, response.text
    assert "lora" in response.text.lower() and "64" in response.text
    fits = tp.http.post(
        f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs",
        params={"rlorTrainerJobId": "max-rank"},
        json={"trainingConfig": {"baseModel": "tiny", "loraRank": 64}},
    )
    assert fits.status_code == 200, fits.text


def test_a_lora_seed_beyond_64_bits_is_a_bad_request_not_a_lost_trainer(
    tp: TrainerPlatform,
) -> None:
    tp.create_job("huge-seed", lora_rank=4)
    raw = RawTinker(tp, "huge-seed")
    body = {
        "session_id": raw.session_id,
        "model_seq_id": 0,
        "base_model": "tiny",
        "lora_config": {"rank": 4, "seed": 2**64},
    }
    answer = raw.post("create_model", body, status=400)  # refused before it is queued
    assert "lora_config.seed" in answer["error"]["message"], answer
    assert tp.job_state("huge-seed") == "JOB_STATE_RUNNING"


# ---------------------------------------------------------------- a full disk


def _mount_tiny_tmpfs(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def test_a_full_disk_is_reported_as_a_full_disk_not_a_lost_trainer(tp: TrainerPlatform) -> None:
    checkpoints = tp.platform.data_dir / "jobs" / "disk-full" / "checkpoints"
    if not _mount_tiny_tmpfs(checkpoints):
        pytest.skip("needs a tmpfs mount (root); test_atomic covers ENOSPC through /dev/full")
    try:
        base_url = tp.create_job("disk-full")
        with FiretitanServiceClient(base_url, tp.api_key) as service:
            client = service.create_training_client("tiny")
            client.forward_backward(BATCH, "cross_entropy").result(timeout=60)
            with pytest.raises(BadRequestError) as failure:  # the SDK's user-category error
                client.save_state("full").result(timeout=60)
            assert failure.value.status_code == 400, str(failure.value)
            assert "no space left on device" in str(failure.value)
            # The directory is named relative to the data dir: never the server's absolute path.
            assert "jobs/disk-full/checkpoints" in str(failure.value)
            assert str(checkpoints) not in str(failure.value)
            assert not is_lost_trainer_symptom(failure.value)
            assert tp.job_state("disk-full") == "JOB_STATE_RUNNING"
            assert _names(checkpoints) == []  # the partial save was removed
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True, timeout=10)


# ---------------------------------------------------------------- an overwrite cut short


def test_a_save_cut_between_its_renames_keeps_the_previous_version_after_restart(
    tmp_path: Path,
) -> None:
    with LocalPlatform(data_dir=tmp_path, timings=FAST_TIMINGS) as first:
        trainer = Trainer(TrainerPlatform(first), "crash")
        trainer.train_step()
        previous = trainer.saved("ckpt")
    # What a crash between moving the old version aside and renaming the new one in leaves:
    # no `ckpt`, the complete old version set aside, a half-written new one.
    checkpoints = tmp_path / "jobs" / "crash" / "checkpoints"
    (checkpoints / "ckpt").rename(checkpoints / ".ckpt.old-0a1b2c3d")
    (checkpoints / ".ckpt.tmp-4e5f6a7b").mkdir()
    (checkpoints / ".ckpt.tmp-4e5f6a7b" / WEIGHTS).write_bytes(b"half")
    with LocalPlatform(data_dir=tmp_path, timings=FAST_TIMINGS) as second:
        assert _names(checkpoints) == ["ckpt"]
        helper = TrainerPlatform(second)
        rows = [row["name"].rsplit("/", 1)[1] for row in helper.checkpoint_rows("crash")]
        assert "ckpt" in rows
        reloaded = Trainer(helper, "crash-reload")
        assert "error" not in reloaded.call("load_weights", path="cross_job://crash/ckpt")
        assert reloaded.saved("reloaded")[0] == previous[0]


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())
