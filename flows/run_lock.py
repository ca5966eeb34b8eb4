"""One run directory, one run: an OS lock on `<run_dir>/.lock`, held by the flow run using it.

Two flows on one run directory would append to one ledger and drive one trainer job. The lock is
`flock` on a file in the run directory: the kernel drops it when its holder exits, however it
exits (kill -9 included), so a crash never leaves a stale lock behind. The holder writes who it is
(pid, host, since when, flow run) into the file, so a refused run can say who holds it.

A flow run takes the lock before it opens its ledger and keeps it across its own retries (the
retries of a Prefect flow run happen in the same process); it gives the lock back when the run
is over. Run directories on other fsspec filesystems (object stores) are not locked: they offer
no lock that dies with its holder, and a lease that outlives a crash would block the rerun that
recovery needs. There the ledger's header check still refuses another run's ledger; keep one
flow per remote run directory (a Prefect concurrency limit on the run name can enforce it).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import fsspec
from fsspec.implementations.local import LocalFileSystem

from flows.failures import RunDirInUseError

__all__ = ["LOCK_FILENAME", "hold_run_dir", "lock_holder", "release_run_dir"]

logger = logging.getLogger(__name__)

LOCK_FILENAME: Final = ".lock"


@dataclass(frozen=True)
class _Held:
    fd: int
    owner: str  # the flow run that holds it


_guard = threading.Lock()
_held: dict[Path, _Held] = {}  # by lock file path


def _lock_path(run_dir: str) -> Path | None:
    """`<run_dir>/.lock` for a local run directory, else None (not locked)."""
    fs, path = fsspec.core.url_to_fs(run_dir)
    if not isinstance(fs, LocalFileSystem):
        return None
    return Path(path).absolute() / LOCK_FILENAME


def lock_holder(path: Path) -> str:
    """Who holds the lock file `path`, as its holder wrote it."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"pid {info['pid']} on {info['host']} since {info['since']}, flow run {info['owner']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def hold_run_dir(run_dir: str, owner: str) -> None:
    """Lock `run_dir` for the flow run `owner`; a no-op if `owner` holds it already.

    Raises `RunDirInUseError` at once (no waiting) when another process, or another flow run
    of this process, holds it.
    """
    path = _lock_path(run_dir)
    if path is None:
        logger.info("run directory %s is not local: not locked", run_dir)
        return
    with _guard:
        held = _held.get(path)
        if held is not None and held.owner == owner:
            return  # a retry of the flow run that holds it
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUseError(run_dir, lock_holder(path)) from None
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "owner": owner}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        _held[path] = _Held(fd=fd, owner=owner)


def release_run_dir(run_dir: str) -> None:
    """Give back the lock of `run_dir` if this process holds it (the file stays)."""
    path = _lock_path(run_dir)
    if path is None:
        return
    with _guard:
        held = _held.pop(path, None)
        if held is not None:
            os.ftruncate(held.fd, 0)
            os.close(held.fd)  # closing the descriptor releases the flock
