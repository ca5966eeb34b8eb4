"""The embedded local backend: started in this process when a run names no platform.

The only module of `flows/` that imports `backend/` (the embedded default platform). One
platform per data directory per process, started on first use and kept for the life of the
process: module globals survive Prefect's flow retries, so a retry reconnects to the same
platform, as it would to a remote one. The data directory persists jobs and checkpoints, so a
run resubmitted after a crash finds its trainer job again (FAILED, then resumed).
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pydantic import SecretStr

from tasks.platform import PlatformEndpoint, Waits

if TYPE_CHECKING:
    from backend import LocalPlatform

__all__ = [
    "EMBEDDED_WAITS",
    "LocalModelFacts",
    "embedded_endpoint",
    "local_model_facts",
    "stop_embedded_platforms",
]

logger = logging.getLogger(__name__)

# The local platform moves a job to RUNNING in under a second: poll it often.
EMBEDDED_WAITS: Final = Waits(
    poll_interval_s=0.1, http_retry_budget_s=60.0, http_retry_base_delay_s=0.1
)

_lock = threading.Lock()
_platforms: dict[Path, LocalPlatform] = {}  # by data directory


def embedded_endpoint(data_dir: Path, waits: Waits | None = None) -> PlatformEndpoint:
    """The endpoint of the embedded platform on `data_dir`, started if it is not running."""
    from backend import LocalPlatform  # the server stack loads only when it is used

    key = data_dir.resolve()
    with _lock:
        platform = _platforms.get(key)
        if platform is None:
            platform = LocalPlatform(data_dir=key)
            platform.start()
            _platforms[key] = platform
            logger.info("embedded local platform on %s (data in %s)", platform.base_url, key)
    return PlatformEndpoint(
        base_url=platform.base_url,
        api_key=SecretStr(platform.api_key),
        waits=waits or EMBEDDED_WAITS,
    )


@dataclass(frozen=True)
class LocalModelFacts:
    """What a run's checks need to know about a local base model before any trainer exists."""

    tokenizer_dir: str  # the directory the trainer reports as its tokenizer (and its context)
    max_lora_rank: int  # the platform refuses a larger rank


def local_model_facts(base_model: str) -> LocalModelFacts | None:
    """The embedded platform's build of `base_model` (built now if needed, in the shared model
    cache the platform uses); None for a name the local registry does not know, which the
    platform then refuses with its own message."""
    from backend.models.cache import resolve_models_dir
    from backend.models.registry import UnknownModelError, resolve_model
    from backend.models.store import tokenizer_dir

    try:
        spec = resolve_model(base_model)
    except UnknownModelError:
        return None
    return LocalModelFacts(
        tokenizer_dir=str(tokenizer_dir(base_model, resolve_models_dir())),
        max_lora_rank=spec.max_lora_rank,
    )


@atexit.register
def stop_embedded_platforms() -> None:
    """Stop every embedded platform this process started (their data stays on disk)."""
    with _lock:
        platforms = list(_platforms.values())
        _platforms.clear()
    for platform in platforms:
        platform.stop()
