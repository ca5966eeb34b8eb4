"""Atomic checkpoint directories: build under a temporary name, mark complete, then rename.

A reader trusts a directory only if its `COMPLETE` marker lists every file with the right size
and SHA-256; the marker is written (and fsynced) last and the rename is atomic on one file
system, so a crash at any point leaves either the old state or a complete new one, never a
half-written checkpoint that could be loaded (design.md, invariant "checkpoints are atomic").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backend.trainer.errors import UserError

MARKER_NAME = "COMPLETE"
_MARKER_FORMAT = "fireloop-complete-v1"
# Threads hashing a directory's files while the caller fsyncs them (hashlib releases the GIL).
_HASH_THREADS = 2


@contextmanager
def atomic_directory(final_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit make it `final_dir`, complete.

    An existing `final_dir` is a `UserError` unless `overwrite`, in which case it is replaced
    only after the new directory is complete. On an exception the temporary directory is removed.
    """
    if final_dir.exists() and not overwrite:
        raise UserError(f"checkpoint {final_dir.name!r} already exists at {final_dir}")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        write_marker(tmp_dir)
        _replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def write_marker(directory: Path) -> None:
    """fsync every file, then write the marker listing their sizes and SHA-256 digests."""
    paths = _files(directory)
    with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="marker-sha256") as pool:
        digests = pool.map(_sha256, paths)  # computed while this thread waits for the disk
        for path in paths:
            _fsync_file(path)
        files: dict[str, dict[str, Any]] = {
            path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": digest}
            for path, digest in zip(paths, digests, strict=True)
        }
    marker = directory / MARKER_NAME
    marker.write_text(json.dumps({"format": _MARKER_FORMAT, "files": files}, indent=1))
    _fsync_file(marker)
    _fsync_dir(directory)


def verify_complete(directory: Path) -> None:
    """Raise `UserError` unless `directory` holds a marker whose sizes and digests all match."""
    marker = directory / MARKER_NAME
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist")
    if not marker.is_file():
        raise UserError(f"checkpoint {directory} is incomplete: no {MARKER_NAME} marker")
    try:
        listing = json.loads(marker.read_text())
        files = listing["files"]
        if listing.get("format") != _MARKER_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown marker format")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {directory} has an unreadable {MARKER_NAME}: {exc}") from exc
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            raise UserError(f"checkpoint {directory} is corrupt: {name} is missing or resized")
        if _sha256(path) != expected["sha256"]:
            raise UserError(f"checkpoint {directory} is corrupt: {name} fails its SHA-256 check")


def _replace(tmp_dir: Path, final_dir: Path) -> None:
    if final_dir.exists():
        # Move the old directory aside first: rename cannot replace a non-empty directory.
        old_dir = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
        final_dir.rename(old_dir)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)
    _fsync_dir(final_dir.parent)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER_NAME)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
