"""Session-wide test setup: everything a test run writes lives under one temporary directory.

Every platform a test starts (in process, or `fireloop backend` as a subprocess, which inherits
the environment) reads `$FIRELOOP_MODEL_CACHE`, so `tiny` is built once per session; a CLI run
without `PREFECT_API_URL` keeps its temporary Prefect server's database under `$PREFECT_HOME`;
temporary files (pytest's own `tmp_path` included) go under `$TMPDIR`. All three point into one
directory that is removed when the session ends, so a test run leaves nothing in the user's home
or in the shared `/tmp`.

Set when this module is imported, not in a hook: pytest imports the conftest files of the
directories it was given before it configures anything, and those import Prefect, which reads
`PREFECT_HOME` once, at import. This file is the first of them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

import pytest

from backend.models.cache import MODEL_CACHE_ENV

_SESSION_DIRS: Final = {MODEL_CACHE_ENV: "models", "PREFECT_HOME": "prefect", "TMPDIR": "tmp"}


def _session_root() -> tuple[Path, dict[str, str | None]]:
    root = Path(tempfile.mkdtemp(prefix="fireloop-tests-"))
    # Removed at interpreter exit, after everything registered later (Prefect's test harness
    # removes its own temporary directory at exit too): atexit runs last-in, first-out.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    previous: dict[str, str | None] = {}
    for name, sub in _SESSION_DIRS.items():
        previous[name] = os.environ.get(name)
        (root / sub).mkdir()
        os.environ[name] = str(root / sub)
    tempfile.tempdir = None  # forget the cached /tmp: the next lookup reads TMPDIR
    return root, previous


SESSION_ROOT, _previous = _session_root()


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = None
