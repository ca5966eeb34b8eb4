"""The on-disk cache of built base models: `<models_dir>/<name>/`, complete or absent.

One cache serves every platform and run on the machine (`backend.models.cache` says where), so a
260 MB SmolLM2 build exists once, not once per run directory. Models are built on first use and
published by a rename after a `COMPLETE` marker that matches the build key and the files; builders
serialise on a file lock, so nobody loads a half-written model. A published model is read-only
(files mode 0444): training and hotload only ever read it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Final, assert_never

import filelock
import transformers
from pydantic import BaseModel, ConfigDict, ValidationError

from backend.models.cache import resolve_models_dir
from backend.models.errors import ModelBuildTimeoutError
from backend.models.registry import LocalModelSpec, resolve_model
from backend.models.smollm2 import convert_smollm2, locate_smollm2_gguf
from backend.models.tiny import build_tiny

__all__ = [
    "ensure_model_dir",
    "model_context_length",
    "read_complete_marker",
    "resolve_models_dir",
    "tokenizer_dir",
]

logger = logging.getLogger(__name__)

MARKER_NAME: Final = "COMPLETE"
# Bump when a builder's output changes: every cached directory then fails its key and rebuilds.
BUILD_FORMAT: Final = "1"
# A SmolLM2 conversion takes ~20 s on 2 cores; a waiter gives a slow machine ample room.
DEFAULT_LOCK_TIMEOUT_S: Final = 600.0


class FileDigest(BaseModel):
    """Size and SHA-256 of one file of a built model directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    sha256: str


class CompleteMarker(BaseModel):
    """The `COMPLETE` marker: what was built, from what, and every file it wrote."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    build_key: dict[str, str]
    files: dict[str, FileDigest]


def ensure_model_dir(
    base_model: str, models_dir: Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> Path:
    """The absolute directory of a complete build of `base_model`, building it if needed.

    Accepts any spelling the registry resolves (`tiny`, `fireloop/tiny`,
    `accounts/<account>/models/tiny`). Raises `UnknownModelError`, `ModelPackageMissingError`,
    or `ModelBuildTimeoutError` when another builder holds the lock past `lock_timeout_s`.
    """
    spec = resolve_model(base_model)
    root = models_dir.resolve()
    model_dir = root / spec.name
    build_key = _build_key(spec)
    if _is_complete(model_dir, spec.name, build_key):
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{spec.name}.lock"
    lock = filelock.FileLock(lock_path, timeout=lock_timeout_s)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ModelBuildTimeoutError(
            f"waited {lock_timeout_s:g} s for another process building {spec.name!r} "
            f"(lock {lock_path}); if no builder is running, remove the lock file and retry"
        ) from None
    try:
        # Another builder may have finished while this one waited for the lock.
        if not _is_complete(model_dir, spec.name, build_key):
            _build_and_publish(spec, root, build_key)
    finally:
        lock.release()
    return model_dir


def tokenizer_dir(
    base_model: str, models_dir: Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> Path:
    """The absolute tokenizer directory of `base_model`: the model directory itself.

    It is what `get_info` reports as `tokenizer_id`, so trainer, inference server and client
    load the same tokenizer files.
    """
    return ensure_model_dir(base_model, models_dir, lock_timeout_s=lock_timeout_s)


def model_context_length(
    base_model: str, models_dir: Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> int:
    """The context length of the built model: `max_position_embeddings` of its config."""
    model_dir = ensure_model_dir(base_model, models_dir, lock_timeout_s=lock_timeout_s)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    context_length = config["max_position_embeddings"]
    if not isinstance(context_length, int):
        raise TypeError(f"{model_dir}/config.json: max_position_embeddings is not an integer")
    return context_length


def read_complete_marker(model_dir: Path) -> CompleteMarker | None:
    """The directory's `COMPLETE` marker, or None when it is missing or unreadable."""
    try:
        return CompleteMarker.model_validate_json((model_dir / MARKER_NAME).read_bytes())
    except (OSError, ValidationError):
        return None


def _build_key(spec: LocalModelSpec) -> dict[str, str]:
    """What a build depends on; a cached directory with another key is rebuilt."""
    key = {
        "build": spec.build,
        "format": BUILD_FORMAT,
        # Saved configs and tokenizer files follow transformers' major version.
        "transformers_major": transformers.__version__.split(".")[0],
    }
    if spec.build == "random_init":
        return key | {"seed": "0", "chat_template": spec.chat_template}
    if spec.build == "smollm2_gguf":
        package = locate_smollm2_gguf()
        gguf_sha256 = _cached_sha256(package.gguf_path, *_stat_identity(package.gguf_path))
        return key | {"package_version": package.version, "gguf_sha256": gguf_sha256}
    assert_never(spec.build)


def _build(spec: LocalModelSpec, out_dir: Path) -> None:
    if spec.build == "random_init":
        build_tiny(out_dir, seed=0, chat_template=spec.chat_template)
    elif spec.build == "smollm2_gguf":
        convert_smollm2(out_dir)
    else:
        assert_never(spec.build)


def _build_and_publish(spec: LocalModelSpec, root: Path, build_key: dict[str, str]) -> None:
    """Build into a temporary directory, mark it complete, then rename it into place."""
    _remove_leftovers(root, spec.name)
    started = time.monotonic()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{spec.name}.tmp-", dir=root))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
        _build(spec, tmp_dir)
        files = {
            path.relative_to(tmp_dir).as_posix(): _digest_and_sync(path)
            for path in sorted(tmp_dir.rglob("*"))
            if path.is_file()
        }
        for path in tmp_dir.rglob("*"):
            if path.is_file():
                # Shared by every run: a stray write (training, hotload) fails instead of
                # silently changing another run's base model.
                path.chmod(0o444)
        marker = CompleteMarker(model=spec.name, build_key=build_key, files=files)
        _write_synced(tmp_dir / MARKER_NAME, marker.model_dump_json(indent=2).encode())
        (tmp_dir / MARKER_NAME).chmod(0o444)
        _publish(tmp_dir, root / spec.name)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("built base model %s in %.1f s", spec.name, time.monotonic() - started)


def _publish(tmp_dir: Path, model_dir: Path) -> None:
    """Rename the finished build over `model_dir`, which may hold an incomplete earlier one."""
    stale_dir = None
    if model_dir.exists():
        # Set the incomplete directory aside first: a rename onto a non-empty directory fails.
        stale_dir = model_dir.with_name(f"{model_dir.name}.stale-{uuid.uuid4().hex[:8]}")
        model_dir.rename(stale_dir)
        logger.warning("rebuilding %s: its directory had no valid COMPLETE marker", model_dir)
    tmp_dir.rename(model_dir)
    _sync_dir(model_dir.parent)
    if stale_dir is not None:
        shutil.rmtree(stale_dir, ignore_errors=True)


def _remove_leftovers(root: Path, name: str) -> None:
    """Remove temporary and stale directories of builders that died; we hold the lock."""
    for pattern in (f"{name}.tmp-*", f"{name}.stale-*"):
        for leftover in root.glob(pattern):
            logger.warning("removing leftover build directory %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _is_complete(model_dir: Path, name: str, build_key: dict[str, str]) -> bool:
    """True when the marker matches this build and every file it lists has its recorded size.

    Sizes are checked on every use (cheap); the SHA-256s are recorded for identity and audits.
    """
    marker = read_complete_marker(model_dir)
    if marker is None or marker.model != name or marker.build_key != build_key:
        return False
    for relative, digest in marker.files.items():
        try:
            if (model_dir / relative).stat().st_size != digest.size:
                return False
        except OSError:
            return False
    return True


def _digest_and_sync(path: Path) -> FileDigest:
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        # Durable before the marker that vouches for it (save_pretrained does not fsync).
        os.fsync(file.fileno())
    return FileDigest(size=path.stat().st_size, sha256=digest)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat_identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime): the GGUF is ~100 MB."""
    del size, mtime_ns  # part of the cache key only: a reinstalled file is hashed again
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
