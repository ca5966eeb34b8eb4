"""Model tests run offline: any accidental hub lookup fails fast instead of hanging."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Before the test modules import transformers: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline even when another test module imported huggingface_hub before this conftest."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
