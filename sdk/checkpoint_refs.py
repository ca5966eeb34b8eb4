"""Names and references of trainer checkpoints and sampler snapshots.

Pure string rules shared by the Firetitan training client, the weight syncer and the flows, kept
apart from the tinker-based clients so that importing them never pulls in tinker (and torch).

* A sampler snapshot is saved as `<name>-<suffix>`, the suffix being 8 hex digits drawn fresh for
  every training client, so a reconnected run never reuses a served snapshot's identity; match
  logical names with `logical_snapshot_name`, because the full name changes on every reconnect.
* A resumable checkpoint is loaded by logical name (this job), by `cross_job://<job>/<name>`
  (another job of the account), or by an absolute path / `gs://` URI.
"""

from __future__ import annotations

import re
import uuid

__all__ = [
    "CROSS_JOB_PREFIX",
    "logical_snapshot_name",
    "make_cross_job_ref",
    "new_snapshot_suffix",
    "qualify_snapshot_name",
    "resolve_checkpoint_path",
]

CROSS_JOB_PREFIX = "cross_job://"
_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def new_snapshot_suffix() -> str:
    """A fresh 8-hex-digit snapshot suffix (one per training client)."""
    return uuid.uuid4().hex[:8]


def qualify_snapshot_name(session_id: str, name: str) -> str:
    """`name` suffixed with the client's snapshot suffix: `step-4` → `step-4-9c1e4f2a`.

    The separator is `-`, not `/`: trainers take the basename of a snapshot directory, which
    would drop a `/`-separated suffix and defeat the uniqueness it provides.
    """
    return f"{name}-{session_id}"


def logical_snapshot_name(snapshot_name: str) -> str:
    """The logical name of a qualified snapshot name (`step-4-9c1e4f2a` → `step-4`)."""
    return _SUFFIX.sub("", snapshot_name)


def make_cross_job_ref(source_job_id: str, checkpoint_name: str) -> str:
    """`cross_job://<job>/<name>`: a checkpoint of another job, resolved by the trainer."""
    job = source_job_id.strip()
    name = checkpoint_name.strip()
    if not job:
        raise ValueError("source_job_id must not be empty")
    if not name:
        raise ValueError("checkpoint name must not be empty")
    if name.startswith(("gs://", "/")) or "/" in name:
        raise ValueError(
            f"checkpoint name {name!r} must be a logical checkpoint name, not a path, "
            "when source_job_id is given"
        )
    return f"{CROSS_JOB_PREFIX}{job}/{name}"


def resolve_checkpoint_path(name: str, source_job_id: str | None = None) -> str:
    """The reference to pass to `load_state[_with_optimizer]` for checkpoint `name`.

    Absolute paths and `gs://` URIs are returned unchanged; with `source_job_id` the result is
    `cross_job://<source_job_id>/<name>`; otherwise the name itself (a checkpoint of the job the
    training client is connected to).
    """
    if name.startswith(("gs://", "/")):
        return name
    if source_job_id is not None and source_job_id.strip():
        return make_cross_job_ref(source_job_id, name)
    return name
