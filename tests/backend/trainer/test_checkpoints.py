"""Checkpoint names and the references `load_weights` accepts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend.trainer.atomic import MARKER_NAME
from backend.trainer.checkpoints import CheckpointStore, ResolvedRef, validate_name
from backend.trainer.errors import UserError


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path)


def _owner(model_id: str) -> str | None:
    return "job-b" if model_id == "s-1:train:0" else None


@pytest.mark.parametrize("name", ["step-2", "step-4-9c1e4f2a", "final_v1.0", "A1"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("a/b", "'/'"), ("..", "'..'"), ("a..b", "'..'"), ("", "invalid"), ("-x", "invalid")],
)
def test_invalid_names_say_why(name: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        validate_name(name)


def test_references_resolve_in_order(store: CheckpointStore, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"

    def resolve(ref: str) -> ResolvedRef:
        return store.resolve(ref, job_id="job-a", model_owner=_owner)

    assert resolve("step-2") == ResolvedRef(
        "state", jobs / "job-a" / "checkpoints" / "step-2", "job-a", "step-2"
    )
    assert resolve("cross_job://job-b/step-2").path == jobs / "job-b" / "checkpoints" / "step-2"
    assert resolve("tinker://job-c/weights/s").path == jobs / "job-c" / "checkpoints" / "s"
    assert resolve("tinker://s-1:train:0/weights/s").job_id == "job-b"
    snapshot = resolve("tinker://job-a/sampler_weights/snap")
    assert (snapshot.kind, snapshot.path) == ("snapshot", jobs / "job-a" / "snapshots" / "snap")
    inside = jobs / "job-x" / "checkpoints" / "c"
    assert resolve(str(inside)) == ResolvedRef("state", inside, None, "c")


@pytest.mark.parametrize("ref", ["/abs/ckpt", "/", "/etc", "{data}/../x", "{data}/jobs/../.."])
def test_absolute_paths_outside_the_data_dir_are_refused_alike(
    store: CheckpointStore, tmp_path: Path, ref: str
) -> None:
    ref = ref.format(data=tmp_path)
    with pytest.raises(UserError) as raised:
        store.resolve(ref, job_id="job-a")
    expected = f"path {ref!r} is outside this platform's data directory"
    assert str(raised.value).startswith(expected)


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("gs://bucket/x", "object-store"),
        ("s3://bucket/x", "unknown scheme"),
        ("cross_job://job-b", "cross_job://<job_id>/<name>"),
        ("cross_job://job-b/a/b", "'/'"),
        ("tinker://job-a/weights", "tinker://<run_id>/<kind>/<name>"),
        ("tinker://job-a/other/x", "kind 'other'"),
        ("tinker://s-9:train:0/weights/x", "not known"),
        ("../escape", "'/'"),
        ("", "empty"),
    ],
)
def test_malformed_references_are_user_errors(
    store: CheckpointStore, ref: str, fragment: str
) -> None:
    with pytest.raises(UserError, match=fragment):
        store.resolve(ref, job_id="job-a", model_owner=_owner)


def test_only_complete_states_are_listed_oldest_first(store: CheckpointStore) -> None:
    for index, name in enumerate(["step-4", "step-2", ".step-6.tmp-1234", "half-written"]):
        directory = (
            store.state_dir("job-a", name)
            if not name.startswith(".")
            else (store.jobs_dir / "job-a" / "checkpoints" / name)
        )
        directory.mkdir(parents=True)
        if name != "half-written":
            marker = directory / MARKER_NAME
            marker.write_text("{}")
            os.utime(marker, ns=(index * 10**9, index * 10**9))
    assert store.list_states("job-a") == ["step-4", "step-2"]
    assert store.list_states("job-none") == []
