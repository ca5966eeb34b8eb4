"""Flow tests: one Prefect test server per session, a local platform per module, offline.

The flows run end to end against the real local platform (`LocalPlatform`, tiny model,
PyTorch on the CPU) under one session-scoped `prefect_test_harness` with heartbeats off
. The platform's API key is a sentinel, so tests can look for it in
everything a run writes. W&B runs offline (no key) and writes under each run's `run_dir`.
"""

from __future__ import annotations

import os

# Before Prefect, tinker and W&B are imported: nothing leaves the machine.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from backend import LocalPlatform
from flows.config import PlatformConfig, SFTConfig
from tasks.platform import Waits
from tests.trainer_support import FAST_TIMINGS

# Short polls and retry back-offs: fault-injection tests spend milliseconds per retry.
FAST_WAITS = Waits(
    poll_interval_s=0.05,
    reconnect_window_s=10.0,
    checkpoint_appear_timeout_s=10.0,
    http_retry_budget_s=30.0,
    http_retry_base_delay_s=0.02,
)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect test server for every flow test of the session, heartbeats off."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings(updates={"flows.heartbeat_frequency": None}),
    ):
        yield


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPlatform]:
    """A local platform whose API key is a sentinel that must never be written anywhere."""
    key = f"fw-local-sentinel{secrets.token_hex(12)}"
    data_dir: Path = tmp_path_factory.mktemp("platform")
    with LocalPlatform(data_dir=data_dir, api_key=key, timings=FAST_TIMINGS) as running:
        yield running
        running.clear_faults()


def platform_config(platform: LocalPlatform) -> PlatformConfig:
    """The config block naming `platform` (its URL and key)."""
    return PlatformConfig(base_url=platform.base_url, api_key=SecretStr(platform.api_key))


def sft_config(platform: LocalPlatform | None, run_dir: Path, **overrides: Any) -> SFTConfig:
    """A small, fast SFT run on the reversal task against `platform` (None: embedded)."""
    fields: dict[str, Any] = {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "max_steps": 20,
        "batch_size": 16,
        "checkpoint_every": 5,
        "eval_every": 0,
        "eval_size": 16,
        "sample_eval": False,
        "retry_delay_s": 0,
        "waits": FAST_WAITS,
    }
    if platform is not None:
        fields["platform"] = platform_config(platform)
    return SFTConfig(**(fields | overrides))


def state_files(platform: LocalPlatform, job_id: str, name: str) -> Path:
    """Where the local trainer keeps checkpoint `name` of `job_id`."""
    return platform.data_dir / "jobs" / job_id / "checkpoints" / name
