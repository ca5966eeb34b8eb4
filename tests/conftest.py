"""Session-wide test setup: one shared model cache for the whole run, never the user's home.

Every platform a test starts (in process, or `fireloop backend` as a subprocess, which inherits
the environment) reads `$FIRELOOP_MODEL_CACHE`, so `tiny` is built once per session; the cache is
removed when the session ends. Set before collection, so no platform can resolve it earlier.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from backend.models.cache import MODEL_CACHE_ENV

_previous: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    _previous[MODEL_CACHE_ENV] = os.environ.get(MODEL_CACHE_ENV)
    os.environ[MODEL_CACHE_ENV] = tempfile.mkdtemp(prefix="fireloop-test-models-")


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = os.environ.get(MODEL_CACHE_ENV)
    if cache is not None and _previous:
        shutil.rmtree(cache, ignore_errors=True)
    previous = _previous.pop(MODEL_CACHE_ENV, None)
    if previous is None:
        os.environ.pop(MODEL_CACHE_ENV, None)
    else:
        os.environ[MODEL_CACHE_ENV] = previous
