"""Bad inputs fail fast, with a message naming what is wrong, before any optimizer step.

Each case runs the real flow (no flow retries: a permanent error would only recur) and checks
that nothing was trained (no `metrics.jsonl`, no checkpoint row) and that checkpoints which
existed before are still there, untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from algorithms.datasets import DatasetError
from backend import LocalPlatform
from flows.ledger import CheckpointRow, LedgerMismatchError, read_ledger
from flows.lifecycle import derive_id
from flows.sft import run_sft
from sdk import (
    BadRequestError,
    DeploymentConfig,
    DeploymentManager,
    FiretitanServiceClient,
    TrainerJobConfig,
    TrainerJobManager,
)
from tasks.errors import DeploymentMismatchError, TrainerMismatchError
from tests.flows.conftest import sft_config
from tests.flows.support import write_foreign_ledger

pytestmark = pytest.mark.usefixtures("prefect_server")


def _assert_nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "metrics.jsonl").exists()
    assert not any(isinstance(row, CheckpointRow) for row in read_ledger(run_dir))


def test_a_missing_dataset_is_named(platform: LocalPlatform, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    config = sft_config(platform, tmp_path / "missing", dataset=str(missing), flow_retries=0)
    with pytest.raises(DatasetError, match=r"nowhere\.jsonl:0: \(file\): no such file"):
        run_sft(config)
    assert not (tmp_path / "missing").exists()  # failed before the ledger was opened


def test_a_malformed_jsonl_line_is_named(platform: LocalPlatform, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    good = (
        '{"messages": [{"role": "user", "content": "ab="}, {"role": "assistant", "content": "ba"}]}'
    )
    data.write_text(f"{good}\n{{not json\n{good}\n", encoding="utf-8")
    config = sft_config(platform, tmp_path / "malformed", dataset=str(data), flow_retries=0)
    with pytest.raises(DatasetError, match=r"chat\.jsonl:2: \(line\): malformed JSON"):
        run_sft(config)
    assert not (tmp_path / "malformed").exists()


def test_an_unknown_base_model_is_refused_by_the_platform(
    platform: LocalPlatform, tmp_path: Path
) -> None:
    run_dir = tmp_path / "unknown-model"
    config = sft_config(platform, run_dir, base_model="fireloop/no-such-model", flow_retries=0)
    with pytest.raises(BadRequestError, match="no-such-model"):
        run_sft(config)
    _assert_nothing_trained(run_dir)


def test_a_lora_rank_the_job_was_not_created_with(platform: LocalPlatform, tmp_path: Path) -> None:
    job_id = "full-parameter-job"
    with TrainerJobManager(platform.api_key, platform.base_url) as trainers:
        job = TrainerJobConfig(base_model="fireloop/tiny", requested_job_id=job_id)
        endpoint = trainers.create_and_wait(job, poll_interval_s=0.05)
        with FiretitanServiceClient(endpoint.base_url, platform.api_key) as service:
            service.create_training_client("fireloop/tiny").save_state("keep-me", timeout=60)
        before = [row.name for row in trainers.list_checkpoints(job_id)]

    run_dir = tmp_path / "wrong-rank"
    config = sft_config(platform, run_dir, lora_rank=8, flow_retries=0)
    platform_config = config.platform
    assert platform_config is not None
    config = config.model_copy(
        update={"platform": platform_config.model_copy(update={"trainer_job_id": job_id})}
    )
    with pytest.raises(TrainerMismatchError, match=rf"{job_id} refused .*lora_rank=8"):
        run_sft(config)
    _assert_nothing_trained(run_dir)
    with TrainerJobManager(platform.api_key, platform.base_url) as trainers:
        assert [row.name for row in trainers.list_checkpoints(job_id)] == before


def test_a_deployment_of_another_base_model(platform: LocalPlatform, tmp_path: Path) -> None:
    with DeploymentManager(platform.api_key, platform.base_url) as deployments:
        chatml = "fireloop/tiny-chatml"
        deployments.create_or_get(
            DeploymentConfig(deployment_id="chatml-deployment", base_model=chatml)
        )
    run_dir = tmp_path / "wrong-deployment"
    # The last attempt failed: teardown runs, and deletes only what the run owns.
    config = sft_config(platform, run_dir, sample_eval=True, flow_retries=0, teardown="delete")
    platform_config = config.platform
    assert platform_config is not None
    update = {"deployment_id": "chatml-deployment"}
    config = config.model_copy(update={"platform": platform_config.model_copy(update=update)})
    with pytest.raises(DeploymentMismatchError, match=r"serves base model .*tiny-chatml"):
        run_sft(config)
    _assert_nothing_trained(run_dir)
    owned_job = derive_id(config.run_name, config.resolved_run_dir, "trainer")
    with TrainerJobManager(platform.api_key, platform.base_url) as trainers:
        job = trainers.try_get(owned_job)
        assert job is not None and job.state == "JOB_STATE_DELETED"
    with DeploymentManager(platform.api_key, platform.base_url) as deployments:
        kept = deployments.get("chatml-deployment")
        assert kept is not None and kept.state not in ("DELETING", "DELETED")


def test_a_run_dir_holding_another_runs_ledger(platform: LocalPlatform, tmp_path: Path) -> None:
    run_dir = tmp_path / "taken"
    write_foreign_ledger(run_dir)
    original = (run_dir / "ledger.jsonl").read_bytes()
    config = sft_config(platform, run_dir, flow_retries=0)
    with pytest.raises(LedgerMismatchError, match="belongs to another run: run_id"):
        run_sft(config)
    assert (run_dir / "ledger.jsonl").read_bytes() == original
    assert not (run_dir / "metrics.jsonl").exists()
