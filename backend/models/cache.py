"""Where the shared cache of built base models lives, decided once per platform.

Kept apart from `backend.models.store` (which imports transformers and torch) so the platform
and the CLI can resolve and print the directory without loading the model stack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

MODEL_CACHE_ENV: Final = "FIRELOOP_MODEL_CACHE"


def default_models_dir() -> Path:
    """`~/.cache/fireloop/models`: the cache when neither an argument nor the env var names one."""
    return Path.home() / ".cache" / "fireloop" / "models"


def resolve_models_dir(explicit: str | Path | None = None) -> Path:
    """The absolute model cache: `explicit`, else `$FIRELOOP_MODEL_CACHE`, else
    `~/.cache/fireloop/models` (not created here)."""
    chosen = explicit if explicit is not None else os.environ.get(MODEL_CACHE_ENV)
    return Path(chosen or default_models_dir()).expanduser().resolve()
