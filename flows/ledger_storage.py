"""Durable writes of the run ledger file, on a local disk or on any fsspec filesystem.

A ledger row counts only once it survives a crash, so local appends are flushed and fsync'd
before they return, and a new file appears complete or not at all (written aside, fsync'd,
renamed, directory fsync'd). Object stores cannot append: there every write rewrites the whole
file to a temporary name and moves it into place (one PUT is atomic), which costs O(file) per
row and assumes a single writer per run - true of a run's flow, which holds the trainer session.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)


class LedgerStorage(Protocol):
    """The five operations the ledger needs from a file."""

    path: str

    def read(self) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        ...

    def create(self, data: bytes) -> None:
        """Create the file with `data`, atomically; it must not exist."""
        ...

    def append(self, data: bytes) -> None:
        """Append `data`; durable when this returns."""
        ...

    def truncate(self, size: int) -> None:
        """Cut the file to its first `size` bytes (drops a torn last line)."""
        ...

    def write_aside(self, suffix: str, data: bytes) -> str:
        """Write `data` to a new file `<path><suffix>` beside the ledger; its path."""
        ...


def storage_for(path: str) -> LedgerStorage:
    """Local storage for plain paths and `file://` URLs, rewrite-then-move for the rest."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(Path(fs_path))
    return FsspecStorage(fs, str(fs_path))


class LocalStorage:
    """A ledger file on a local (POSIX) filesystem: appends with flush + fsync."""

    def __init__(self, path: Path) -> None:
        self._file = path
        self.path = str(path)

    def read(self) -> bytes | None:
        try:
            return self._file.read_bytes()
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> None:
        self._file.parent.mkdir(parents=True, exist_ok=True)
        if self._file.exists():
            raise FileExistsError(f"{self._file} already exists")
        tmp = self._file.with_name(f".{self._file.name}.tmp-{uuid.uuid4().hex[:8]}")
        _write_synced(tmp, data, mode="wb")
        tmp.replace(self._file)
        _sync_dir(self._file.parent)

    def append(self, data: bytes) -> None:
        _write_synced(self._file, data, mode="ab")

    def truncate(self, size: int) -> None:
        with self._file.open("r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())

    def write_aside(self, suffix: str, data: bytes) -> str:
        aside = self._file.with_name(self._file.name + suffix)
        _write_synced(aside, data, mode="xb")
        _sync_dir(aside.parent)
        return str(aside)


class FsspecStorage:
    """A ledger file on a filesystem that may not append (object stores, `memory://`)."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self.path = path

    def read(self) -> bytes | None:
        if not self._fs.exists(self.path):
            return None
        data: bytes = self._fs.cat_file(self.path)
        return data

    def create(self, data: bytes) -> None:
        if self._fs.exists(self.path):
            raise FileExistsError(f"{self.path} already exists")
        self._put(self.path, data)

    def append(self, data: bytes) -> None:
        self._put(self.path, (self.read() or b"") + data)

    def truncate(self, size: int) -> None:
        self._put(self.path, (self.read() or b"")[:size])

    def write_aside(self, suffix: str, data: bytes) -> str:
        aside = self.path + suffix
        self._put(aside, data)
        return aside

    def _put(self, path: str, data: bytes) -> None:
        """Write to a temporary name, then move it over `path` (rewrite-then-rename)."""
        parent = path.rsplit("/", 1)[0]
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self._fs.open(tmp, "wb") as handle:
            handle.write(data)
        self._fs.mv(tmp, path)


def _write_synced(path: Path, data: bytes, *, mode: str) -> None:
    with path.open(mode) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_dir(directory: Path) -> None:
    """fsync a directory so a rename or a new file in it survives a crash (POSIX only)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
