"""The embedded local backend: started in this process when a run names no platform.

The only module of `flows/` that imports `backend/` (the embedded default platform). One
platform per data directory, held by leases: each attempt of a run acquires one under its flow
run's id (a flow retry keeps that id, so it finds the same platform and URL, as it would a
remote one), the run releases it when it is over, and the last release stops the platform. The
data directory persists jobs and checkpoints, so a run started again after a crash finds its
trainer job (FAILED, then resumed). At most `FIRELOOP_MAX_EMBEDDED_PLATFORMS` (default 4) run
at once in one process: a long-lived `serve` process cannot pile up servers and models.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final
from uuid import uuid4

from pydantic import SecretStr

from sdk import ConfigError
from tasks.platform import PlatformEndpoint, Waits

if TYPE_CHECKING:
    from backend import LocalPlatform

__all__ = [
    "DEFAULT_MAX_EMBEDDED_PLATFORMS",
    "EMBEDDED_WAITS",
    "MAX_EMBEDDED_PLATFORMS_ENV",
    "EmbeddedPlatformLimitError",
    "LocalModelFacts",
    "acquire_embedded",
    "embedded_endpoint",
    "embedded_lease",
    "embedded_platform",
    "live_embedded_platforms",
    "local_model_facts",
    "release_embedded",
    "stop_embedded_platforms",
]

logger = logging.getLogger(__name__)

# The local platform moves a job to RUNNING in under a second: poll it often.
EMBEDDED_WAITS: Final = Waits(
    poll_interval_s=0.1, http_retry_budget_s=60.0, http_retry_base_delay_s=0.1
)
MAX_EMBEDDED_PLATFORMS_ENV: Final = "FIRELOOP_MAX_EMBEDDED_PLATFORMS"
DEFAULT_MAX_EMBEDDED_PLATFORMS: Final = 4
# The holder of `embedded_endpoint`'s platforms: released only when the process exits.
_PROCESS_OWNER: Final = "process"


class EmbeddedPlatformLimitError(ConfigError):
    """This process already runs as many embedded platforms as it may; raised before a run
    starts one more (and before any compute)."""


@dataclass
class _Leased:
    platform: LocalPlatform
    owners: set[str] = field(default_factory=set)  # flow runs (or callers) holding it


_lock = threading.Lock()
_platforms: dict[Path, _Leased] = {}  # by data directory


def _max_platforms() -> int:
    raw = os.environ.get(MAX_EMBEDDED_PLATFORMS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_EMBEDDED_PLATFORMS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{MAX_EMBEDDED_PLATFORMS_ENV}={raw!r}: expected a whole number >= 1")
    return limit


def acquire_embedded(data_dir: Path, owner: str, waits: Waits | None = None) -> PlatformEndpoint:
    """A lease for `owner` on the embedded platform of `data_dir`, started if none runs; the
    same owner acquiring again holds one lease. `EmbeddedPlatformLimitError` when starting it
    would exceed the process's limit."""
    from backend import LocalPlatform  # the server stack loads only when it is used

    key = data_dir.resolve()
    with _lock:
        leased = _platforms.get(key)
        if leased is None:
            limit = _max_platforms()
            if len(_platforms) >= limit:
                held = ", ".join(str(path) for path in _platforms)
                raise EmbeddedPlatformLimitError(
                    f"{MAX_EMBEDDED_PLATFORMS_ENV}: {len(_platforms)} embedded platforms already "
                    f"run in this process (data in {held}), the limit is {limit}; wait for a "
                    f"run to end, raise {MAX_EMBEDDED_PLATFORMS_ENV}, or name a standalone "
                    "`fireloop backend` in platform"
                )
            platform = LocalPlatform(data_dir=key)
            platform.start()
            leased = _platforms[key] = _Leased(platform)
            logger.info("embedded local platform on %s (data in %s)", platform.base_url, key)
        leased.owners.add(owner)
        platform = leased.platform
    return PlatformEndpoint(
        base_url=platform.base_url,
        api_key=SecretStr(platform.api_key),
        waits=waits or EMBEDDED_WAITS,
    )


def release_embedded(owner: str) -> None:
    """Give back every lease `owner` holds; a platform left with none stops (its data stays)."""
    with _lock:
        for key, leased in list(_platforms.items()):
            if owner not in leased.owners:
                continue
            leased.owners.discard(owner)
            if not leased.owners:
                # Stopped under the lock: a run starting on the same data directory meanwhile
                # must not open its store while this platform still has it open.
                del _platforms[key]
                leased.platform.stop()
                logger.info("embedded local platform on %s stopped", key)


@contextmanager
def embedded_lease(data_dir: Path, waits: Waits | None = None) -> Iterator[PlatformEndpoint]:
    """Hold the embedded platform of `data_dir` for the block (runs that share it, like the
    RL demo's two, find it running; it stops at the end unless a run still holds it)."""
    owner = f"lease-{uuid4().hex}"
    endpoint = acquire_embedded(data_dir, owner, waits)
    try:
        yield endpoint
    finally:
        release_embedded(owner)


def embedded_endpoint(data_dir: Path, waits: Waits | None = None) -> PlatformEndpoint:
    """The embedded platform of `data_dir`, held until the process exits (scripts, benches)."""
    return acquire_embedded(data_dir, _PROCESS_OWNER, waits)


def embedded_platform(data_dir: Path) -> LocalPlatform | None:
    """The running embedded platform of `data_dir`, if any (to inject faults into, in tests)."""
    with _lock:
        leased = _platforms.get(data_dir.resolve())
    return leased.platform if leased is not None else None


def live_embedded_platforms() -> dict[str, str]:
    """The base URL of every embedded platform this process runs, by data directory."""
    with _lock:
        return {str(key): leased.platform.base_url for key, leased in _platforms.items()}


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
        platforms = [leased.platform for leased in _platforms.values()]
        _platforms.clear()
    for platform in platforms:
        platform.stop()
