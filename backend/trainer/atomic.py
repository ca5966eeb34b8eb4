"""Atomic checkpoint directories: build under a temporary name, mark complete, then rename.

A reader trusts a directory only if its `COMPLETE` marker lists every file with the right size
and SHA-256 (a writer that hashed a file while writing it declares that digest with
`record_digest`, so the file is not read back); the marker is written (and fsynced) last and
the rename is atomic on one file system, so a crash at any point leaves either the old state or
a complete new one, never a half-written checkpoint that could be loaded.
Overwriting swaps the two directories in one step (`exchange_directories`), so some complete
version is listed at every instant; `recover_directories` cleans what crashed saves left behind.
A full disk is reported as `DiskFullError`, never as a lost trainer.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backend.trainer.errors import DiskFullError, UserError

logger = logging.getLogger(__name__)

MARKER_NAME = "COMPLETE"
_MARKER_FORMAT = "fireloop-complete-v1"
# Threads hashing a directory's files while the caller fsyncs them (hashlib releases the GIL).
_HASH_THREADS = 2


# The disk (or the user's quota) is full: the same write fails on any trainer until space is freed.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Free space below which a failed write is taken to have hit a full disk (writes fill a disk to
# its last blocks before they fail; a healthy one has far more left).
_NEARLY_FULL_BYTES = 1 << 20
# renameat2(2) flag: swap two paths atomically (Linux 3.15+, on ext4, xfs, btrfs, tmpfs, ...).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

Swapped = Callable[[], None]

# Digests declared with `record_digest`, per temporary directory of a save in progress (file
# name → hex). Saves run on several threads (trainers, promotion), hence the lock.
_declared: dict[Path, dict[str, str]] = {}
_declared_lock = threading.Lock()


@contextmanager
def atomic_directory(
    final_dir: Path,
    *,
    overwrite: bool = False,
    on_swapped: Swapped | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit make it `final_dir`, complete.

    The marker lists the digests of files written in the block that were declared with
    `record_digest`, and hashes every other file.

    An existing `final_dir` is a `UserError` unless `overwrite`, in which case it is replaced
    only after the new directory is complete. On an exception the temporary directory is removed.
    `on_swapped` runs after the new version took the final name and before the old one is
    removed (tests use it to stop a save there, as a crash would). A full disk anywhere in the
    save raises `DiskFullError` naming the directory.
    """
    if final_dir.exists() and not overwrite:
        raise UserError(f"checkpoint {final_dir.name!r} already exists at {final_dir}")
    tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    declared: dict[str, str] = {}
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir()
        with _declared_digests(tmp_dir, declared):
            yield tmp_dir
        write_marker(tmp_dir, declared)
        _replace(tmp_dir, final_dir, on_swapped)
    except BaseException as exc:
        # Judged before the partial files are removed: they are what filled the disk.
        disk_full = _disk_full(exc, final_dir.parent)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if disk_full:
            raise DiskFullError(
                f"no space left on device while writing {final_dir.name!r} in "
                f"{final_dir.parent}: free disk space there, then save again"
            ) from exc
        raise


def record_digest(path: Path, digest: str) -> None:
    """Declare `digest` the SHA-256 of the file its writer just wrote at `path`, computed over
    the very bytes written. Inside an `atomic_directory` block the marker lists it instead of
    reading the file back; anywhere else it is ignored. Readers still check every file."""
    with _declared_lock:
        for directory, declared in _declared.items():
            if path.parent == directory:
                declared[path.name] = digest


@contextmanager
def _declared_digests(directory: Path, declared: dict[str, str]) -> Iterator[None]:
    with _declared_lock:
        _declared[directory] = declared
    try:
        yield
    finally:
        with _declared_lock:
            del _declared[directory]


def _disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write failed because the disk is full.

    An `OSError` says so by its errno. Writers in other languages do not (safetensors raises
    its own error type around the OS error), so for any other failure the file system is
    asked: a write that stopped with less than `_NEARLY_FULL_BYTES` left stopped on a full disk.
    A `UserError` is the request's own fault and stays what it is.
    """
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    if not isinstance(exc, Exception) or isinstance(exc, UserError):
        return False
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def write_marker(directory: Path, known: Mapping[str, str] | None = None) -> None:
    """fsync every file, then write the marker listing their sizes and SHA-256 digests.

    `known`: digests the writer computed over the very bytes it wrote (relative path → hex),
    taken as they are instead of reading those files back; every other file is hashed here.
    """
    known = known or {}
    paths = _files(directory)
    names = [path.relative_to(directory).as_posix() for path in paths]
    if unknown := sorted(known.keys() - set(names)):
        raise ValueError(f"digests given for files not in {directory}: {unknown[:3]}")
    with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="marker-sha256") as pool:
        # Computed while this thread waits for the disk.
        digests = [
            known[name] if name in known else pool.submit(_sha256, path)
            for name, path in zip(names, paths, strict=True)
        ]
        for path in paths:
            _fsync_file(path)
        files: dict[str, dict[str, Any]] = {
            name: {
                "size": path.stat().st_size,
                "sha256": digest if isinstance(digest, str) else digest.result(),
            }
            for name, path, digest in zip(names, paths, digests, strict=True)
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


def _replace(tmp_dir: Path, final_dir: Path, on_swapped: Swapped | None = None) -> None:
    """Make the complete `tmp_dir` the directory `final_dir`, leaving no instant without one.

    Why an exchange: a rename cannot replace a non-empty directory, and moving the old one aside
    first (two renames) leaves a moment, and after a crash a whole restart, in which no version
    is listed. `renameat2(RENAME_EXCHANGE)` swaps the two names in one atomic step; the old
    version then sits under the temporary name until it is removed (by us, or by
    `recover_directories` after a crash). Where the kernel or file system cannot exchange, two
    renames remain, and `recover_directories` puts the set-aside version back after a crash.
    A symlink swapped with `os.replace` would also be atomic, but would make every checkpoint a
    link that deleting, copying and exporting code would all have to follow.
    """
    if final_dir.exists():
        if exchange_directories(tmp_dir, final_dir):
            old_dir = tmp_dir  # the exchange left the previous version under the temporary name
        else:
            old_dir = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}"
            final_dir.rename(old_dir)
            tmp_dir.rename(final_dir)
        _fsync_dir(final_dir.parent)
        if on_swapped is not None:
            on_swapped()
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)
        _fsync_dir(final_dir.parent)


def exchange_directories(first: Path, second: Path) -> bool:
    """Swap two directories atomically; False where the platform cannot (then nothing moved)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(second))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[..., int] = libc.renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    return function


def recover_directories(root: Path) -> None:
    """Clean up after saves that crashed, for every checkpoint directory under `root`.

    A temporary `.<name>.tmp-*` is removed (a crash mid-save, or the old version left by an
    exchange). A set-aside `.<name>.old-*` (the two-rename fallback) is renamed back to `<name>`
    when `<name>` is missing and it is complete, else removed. Run it only while no save runs
    (the platform calls it when it starts).
    """
    if not root.is_dir():
        return
    for parent in sorted({path.parent for path in root.rglob(".*.*-*") if path.is_dir()}):
        for entry in sorted(parent.iterdir()):
            name, kind = _leftover(entry.name)
            if name is None:
                continue
            final_dir = parent / name
            if kind == "old" and not final_dir.exists() and (entry / MARKER_NAME).is_file():
                logger.warning("restoring %s from a save that stopped half-way", final_dir)
                entry.rename(final_dir)
            else:
                logger.info("removing %s left by a save that did not finish", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _leftover(entry_name: str) -> tuple[str | None, str]:
    """`(name, "tmp" | "old")` for `.<name>.tmp-<hex>` / `.<name>.old-<hex>`, else `(None, "")`."""
    if not entry_name.startswith("."):
        return None, ""
    for kind in ("tmp", "old"):
        name, sep, suffix = entry_name[1:].rpartition(f".{kind}-")
        if sep and name and suffix and all(c in "0123456789abcdef" for c in suffix):
            return name, kind
    return None, ""


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
