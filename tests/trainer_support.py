"""Shared by the tests that train through the trainer gateway: a fast platform and datums.

The platform is real (`LocalPlatform`, loopback HTTP, the `tiny` model, PyTorch on the CPU);
only its timers are short. Jobs are created over raw HTTP and polled until RUNNING, so these
helpers depend on the control-plane wire, not on the SDK under test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from tinker import types

from backend import LocalPlatform, PlatformTimings
from backend.trainer.service import TrainerSettings

ACCOUNT = "local"
FAST_TIMINGS = PlatformTimings(
    job_pending_s=0.01,
    job_creating_s=0.01,
    deployment_creating_s=0.01,
    deployment_updating_s=0.01,
)
TINY_CONTEXT = 64  # the jobs' max_context_length (the tiny model allows 256)
# A short long-poll hold, so a test polling a result that is not ready waits briefly.
FAST_TRAINERS = TrainerSettings(retrieve_hold_s=0.5)
_RUNNING_TIMEOUT_S = 10.0


class TrainerPlatform:
    """A running `LocalPlatform` plus helpers to create trainer jobs and inspect them."""

    def __init__(self, platform: LocalPlatform) -> None:
        self.platform = platform
        platform.state.trainers.settings = FAST_TRAINERS
        self.http = httpx.Client(
            base_url=platform.base_url, headers={"X-Api-Key": platform.api_key}, timeout=30.0
        )

    @property
    def api_key(self) -> str:
        return self.platform.api_key

    def trainer_url(self, job_id: str) -> str:
        return f"{self.platform.base_url}/training/v1/rlorTrainerJobs/{ACCOUNT}/{job_id}"

    def create_job(
        self,
        job_id: str,
        *,
        lora_rank: int = 0,
        base_model: str = "tiny",
        max_context_length: int = TINY_CONTEXT,
    ) -> str:
        """Create a trainer job and wait until it is RUNNING; its trainer base URL."""
        config = {
            "baseModel": base_model,
            "loraRank": lora_rank,
            "maxContextLength": max_context_length,
        }
        response = self.http.post(
            f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs",
            params={"rlorTrainerJobId": job_id},
            json={"trainingConfig": config},
        )
        assert response.status_code == 200, response.text
        self.wait_running(job_id)
        return self.trainer_url(job_id)

    def job_state(self, job_id: str) -> str:
        response = self.http.get(f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}")
        assert response.status_code == 200, response.text
        state: str = response.json()["state"]
        return state

    def wait_running(self, job_id: str) -> None:
        deadline = time.monotonic() + _RUNNING_TIMEOUT_S
        while self.job_state(job_id) != "JOB_STATE_RUNNING":
            assert time.monotonic() < deadline, f"job {job_id} did not reach RUNNING"
            time.sleep(0.01)

    def checkpoint_rows(self, job_id: str) -> list[dict[str, Any]]:
        """The control plane's checkpoint rows of the job (oldest first)."""
        response = self.http.get(f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}/checkpoints")
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["checkpoints"]
        return rows

    def state_dir(self, job_id: str, name: str) -> Path:
        return self.platform.data_dir / "jobs" / job_id / "checkpoints" / name

    def close(self) -> None:
        self.http.close()


def reversal_datum(word: str) -> types.Datum:
    """`word=` + reversed(word) + EOS as next-token targets, loss on the answer only."""
    tokens = [*word.encode(), ord("="), *word[::-1].encode(), 258]
    prompt_len = len(word) + 1
    inputs, targets = tokens[:-1], tokens[1:]
    weights = [0.0 if i < prompt_len - 1 else 1.0 for i in range(len(targets))]
    return make_datum(inputs, targets, weights)


def make_datum(tokens: list[int], targets: list[int], weights: list[float]) -> types.Datum:
    """A cross-entropy datum; the lengths are not checked (tests send bad ones on purpose)."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


BATCH = [reversal_datum(word) for word in ("abc", "dcab", "bad", "cabd")]
