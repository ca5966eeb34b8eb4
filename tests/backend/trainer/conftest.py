"""Trainer engine tests: offline, two threads, one tiny model directory for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before transformers is imported: any accidental hub lookup fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def two_threads() -> None:
    # Fixed thread count: CPU results are bitwise reproducible only at a fixed count.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)
