"""Atomic checkpoint directories: overwrite without a gap, recovery after a crash, a full disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from backend.trainer.atomic import (
    MARKER_NAME,
    atomic_directory,
    exchange_directories,
    recover_directories,
    verify_complete,
)
from backend.trainer.checkpoints import CheckpointStore
from backend.trainer.errors import DiskFullError
from backend.trainer.futures import error_payload


def _save(
    final_dir: Path,
    content: str,
    *,
    overwrite: bool = False,
    on_swapped: Callable[[], None] | None = None,
) -> None:
    with atomic_directory(final_dir, overwrite=overwrite, on_swapped=on_swapped) as tmp_dir:
        (tmp_dir / "weights").write_text(content)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path)


def test_an_overwrite_lists_a_complete_version_at_every_step(store: CheckpointStore) -> None:
    final_dir = store.state_dir("job", "ckpt")
    _save(final_dir, "v1")
    seen: list[str] = []

    def at_swap() -> None:  # between the swap and the removal of the old version
        assert store.list_states("job") == ["ckpt"]
        verify_complete(final_dir)
        seen.append((final_dir / "weights").read_text())

    _save(final_dir, "v2", overwrite=True, on_swapped=at_swap)
    assert seen == ["v2"]
    assert (final_dir / "weights").read_text() == "v2"
    assert _names(final_dir.parent) == ["ckpt"]  # the old version is gone


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b").mkdir()
    if not exchange_directories(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this kernel or file system cannot exchange (two renames are used)")
    assert (tmp_path / "b" / "f").read_text() == "a"
    assert not (tmp_path / "a" / "f").exists()


def test_recovery_restores_set_aside_versions_and_removes_leftovers(
    store: CheckpointStore, tmp_path: Path
) -> None:
    root = tmp_path / "jobs" / "job" / "checkpoints"
    _save(root / ".lost.old-0123abcd", "previous")  # crash between two renames: restored
    _save(root / "kept", "current")
    _save(root / ".kept.old-4567cdef", "older")  # its name exists: removed
    (root / ".broken.old-89abcdef").mkdir()  # incomplete: removed, never listed
    (root / ".ckpt.tmp-deadbeef").mkdir()  # a save that died mid-write: removed
    (root / ".ckpt.tmp-deadbeef" / "weights").write_text("half")
    snapshots = tmp_path / "jobs" / "job" / "snapshots"
    (snapshots / ".snap.tmp-0badf00d").mkdir(parents=True)

    recover_directories(tmp_path / "jobs")

    assert _names(root) == ["kept", "lost"]
    assert (root / "lost" / "weights").read_text() == "previous"
    assert (root / "kept" / "weights").read_text() == "current"
    assert set(store.list_states("job")) == {"lost", "kept"}
    assert _names(snapshots) == []


def test_a_full_disk_is_a_disk_full_error_and_leaves_nothing(store: CheckpointStore) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system (Linux provides one)")
    final_dir = store.state_dir("job", "ckpt")
    with pytest.raises(DiskFullError) as raised, atomic_directory(final_dir) as tmp_dir:
        # Writes to /dev/full fail with ENOSPC: a real full disk, without filling one.
        (tmp_dir / "weights").symlink_to("/dev/full")
        (tmp_dir / "weights").write_bytes(b"\0" * 4096)
    message = str(raised.value)
    assert "no space left on device" in message and str(final_dir.parent) in message
    assert error_payload(raised.value)["category"] == "user"
    assert _names(final_dir.parent) == []
    assert not (final_dir / MARKER_NAME).exists()


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())
