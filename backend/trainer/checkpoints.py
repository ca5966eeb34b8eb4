"""Where a trainer job's checkpoints live, and how the references clients send resolve to them.

Storage is per job, not per session, so a reconnected client (new session, new training
client) still finds what an earlier one saved: resumable states under
`<data_dir>/jobs/<job>/checkpoints/<name>`, sampler snapshots under
`<data_dir>/jobs/<job>/snapshots/<name>`. Directories are written atomically by the engine
(temporary name, `COMPLETE` marker, rename), so a directory under its final name is complete.

References accepted by `load_weights`, `weights_info` and the sampler routes, in this order:
`tinker://<run>/weights/<name>` (a job id, or a model id of this trainer), `tinker://<run>/
sampler_weights/<name>`, `cross_job://<job>/<name>`, a bare name (this job), an absolute path
(a checkpoint directory), and `gs://…` (refused: there is no object store locally).
Every resolved path must lie inside the data directory once symlinks and `..` are resolved; this
is checked before anything looks at the path, and an outside path gets one message whether it
exists or not, so a client learns nothing about the rest of the file system.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from backend.trainer.atomic import MARKER_NAME
from backend.trainer.errors import UserError

__all__ = ["CheckpointStore", "ResolvedRef", "validate_name"]

RefKind = Literal["state", "snapshot"]

# One path segment, DNS-label-like: letters, digits, '-', '_', '.'; starts alphanumeric.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TINKER_SCHEME = "tinker://"
_CROSS_JOB_SCHEME = "cross_job://"
_KIND_DIRS: dict[str, RefKind] = {"weights": "state", "sampler_weights": "snapshot"}


def validate_name(name: str, what: str = "checkpoint name") -> str:
    """`name` if it is a safe single directory name, else a `UserError` saying why."""
    if "/" in name or "\\" in name:
        raise UserError(f"{what} {name!r} must not contain '/': it names one directory")
    if ".." in name:
        raise UserError(f"{what} {name!r} must not contain '..'")
    if not _NAME.match(name):
        raise UserError(
            f"{what} {name!r} is invalid: use 1-128 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ResolvedRef:
    """A reference resolved to a directory: a resumable state or a sampler snapshot."""

    kind: RefKind
    path: Path
    job_id: str | None  # None for an absolute path outside the job tree
    name: str


class CheckpointStore:
    """Paths of every job's checkpoints and snapshots under one data directory."""

    def __init__(self, data_dir: Path, *, models_dir: Path | None = None) -> None:
        """`models_dir`: the model cache, where adapters may also be read from."""
        self.jobs_dir = data_dir / "jobs"
        self._data_root = Path(os.path.realpath(data_dir))
        self._read_roots = [self._data_root]
        # Absolute roots never shown to a client, each with what a message says instead:
        # paths inside the data directory become relative to it.
        hidden = {str(data_dir): "", str(self._data_root): ""}
        if models_dir is not None:
            self._read_roots.append(Path(os.path.realpath(models_dir)))
            hidden |= {
                str(models_dir): "<model cache>/",
                os.path.realpath(models_dir): "<model cache>/",
            }
        # Longest first, so a root inside another is cut before its parent.
        self._hidden = sorted(hidden.items(), key=lambda item: -len(item[0]))

    def relative(self, message: str) -> str:
        """`message` with the server's absolute directories cut out of the paths it names
        (`jobs/<job>/checkpoints/<name>`), so a client never learns where the files live."""
        for root, shown in self._hidden:
            message = message.replace(root + os.sep, shown).replace(root, shown or "<data dir>")
        return message

    @contextmanager
    def relative_errors(self) -> Iterator[None]:
        """Re-raise a `UserError` of the block with `relative` applied to its message."""
        try:
            yield
        except UserError as exc:
            raise type(exc)(self.relative(str(exc))) from exc

    def inside(
        self, path: Path, ref: str, *, what: str = "path", model_cache: bool = False
    ) -> Path:
        """`path` with symlinks and `..` resolved, if that lies inside the data directory (or,
        with `model_cache`, the model cache); else a `UserError` that does not depend on what
        exists there. Called before anything else touches the path."""
        real = Path(os.path.realpath(path))
        roots = self._read_roots if model_cache else [self._data_root]
        if not any(real.is_relative_to(root) for root in roots):
            where = "data directory or model cache" if model_cache else "data directory"
            raise UserError(
                f"{what} {ref!r} is outside this platform's {where}: loads and saves stay inside it"
            )
        return real

    def state_dir(self, job_id: str, name: str) -> Path:
        path = self.jobs_dir / validate_name(job_id, "job id") / "checkpoints" / validate_name(name)
        return self.inside(path, name, what="checkpoint")

    def snapshot_dir(self, job_id: str, name: str) -> Path:
        snapshots = self.jobs_dir / validate_name(job_id, "job id") / "snapshots"
        return self.inside(snapshots / validate_name(name, "snapshot name"), name, what="snapshot")

    def list_states(self, job_id: str) -> list[str]:
        """Names of the job's complete resumable states, oldest first."""
        root = self.jobs_dir / job_id / "checkpoints"
        if not root.is_dir():
            return []
        complete = [
            (marker.stat().st_mtime_ns, entry.name)
            for entry in root.iterdir()
            # Temporary and replaced directories start with '.'; never list them.
            if not entry.name.startswith(".") and (marker := entry / MARKER_NAME).is_file()
        ]
        return [name for _, name in sorted(complete)]

    def resolve(
        self,
        ref: str,
        *,
        job_id: str,
        model_owner: Callable[[str], str | None] | None = None,
    ) -> ResolvedRef:
        """Resolve `ref` as seen from job `job_id`; `UserError` for malformed refs.

        `model_owner` maps a model id (`tinker://<model id>/weights/<name>`) to its job.
        Existence is not checked here: the loader verifies the directory's completion marker.
        """
        ref = ref.strip()
        if not ref:
            raise UserError("path must not be empty")
        if ref.startswith(_TINKER_SCHEME):
            return self._resolve_tinker(ref, job_id, model_owner)
        if ref.startswith(_CROSS_JOB_SCHEME):
            source_job, sep, name = ref.removeprefix(_CROSS_JOB_SCHEME).partition("/")
            if not sep or not source_job:
                raise UserError(f"path {ref!r}: expected cross_job://<job_id>/<name>")
            validate_name(source_job, "job id")
            return ResolvedRef("state", self.state_dir(source_job, name), source_job, name)
        if ref.startswith("gs://"):
            raise UserError(
                f"path {ref!r}: object-store paths are not available on the local platform; "
                "use a checkpoint name, cross_job://<job>/<name> or an absolute path"
            )
        if "://" in ref:
            raise UserError(f"path {ref!r}: unknown scheme (expected tinker:// or cross_job://)")
        if ref.startswith("/"):
            path = self.inside(Path(ref), ref)  # before any look at what is there
            kind: RefKind = "snapshot" if path.parent.name == "snapshots" else "state"
            return ResolvedRef(kind, path, None, path.name)
        return ResolvedRef("state", self.state_dir(job_id, ref), job_id, ref)

    def _resolve_tinker(
        self, ref: str, job_id: str, model_owner: Callable[[str], str | None] | None
    ) -> ResolvedRef:
        parts = ref.removeprefix(_TINKER_SCHEME).split("/")
        if len(parts) != 3 or not all(parts):
            raise UserError(f"path {ref!r}: expected tinker://<run_id>/<kind>/<name>")
        run, kind_dir, name = parts
        kind = _KIND_DIRS.get(kind_dir)
        if kind is None:
            raise UserError(
                f"path {ref!r}: kind {kind_dir!r} is not one of {', '.join(_KIND_DIRS)}"
            )
        owner = run
        if ":" in run:  # a model id (`session:train:n`); job ids never contain ':'
            found = model_owner(run) if model_owner is not None else None
            if found is None:
                raise UserError(f"path {ref!r}: model {run!r} is not known to this trainer")
            owner = found
        else:
            validate_name(run, "job id")
        path = self.state_dir(owner, name) if kind == "state" else self.snapshot_dir(owner, name)
        return ResolvedRef(kind, path, owner, name)

    @staticmethod
    def state_uri(job_id: str, name: str) -> str:
        """The path `save_weights` answers: `tinker://<job>/weights/<name>`."""
        return f"{_TINKER_SCHEME}{job_id}/weights/{name}"
