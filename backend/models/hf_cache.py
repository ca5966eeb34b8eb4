"""Local models' tokenizers in the Hugging Face hub cache layout, for clients that look them up
by name.

Stock tinker clients and cookbook recipes call `AutoTokenizer.from_pretrained(<model name>)`.
Offline (`HF_HUB_OFFLINE=1`) that call reads `<hub cache>/models--<org>--<name>/refs/main` and
loads the snapshot directory it names, so publishing a local model's tokenizer files there under
its hub name (`fireloop/tiny`) lets such clients find them with no download and no code change.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

from backend.models.registry import resolve_model
from backend.models.store import ensure_model_dir

# Weights are not needed to build a tokenizer; the marker belongs to the model cache only.
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_SKIPPED_NAMES = ("COMPLETE",)


def default_hub_dir(hf_home: Path | None) -> Path:
    """The hub cache of a Hugging Face home: `<hf_home>/hub`, `~/.cache/huggingface/hub` when
    no home is given (the library's own default)."""
    home = hf_home if hf_home is not None else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def publish_tokenizer(base_model: str, models_dir: Path, hub_dir: Path) -> Path:
    """Copies `base_model`'s tokenizer files into `hub_dir` under its hub name; the snapshot
    directory.

    The snapshot is named by a digest of the files (40 hex digits, like a commit), written under
    a temporary name and renamed into place, then `refs/main` is pointed at it: a reader never
    sees a half-written snapshot, and publishing the same files again changes nothing.
    """
    spec = resolve_model(base_model)
    model_dir = ensure_model_dir(spec.name, models_dir)
    files = sorted(
        path
        for path in model_dir.iterdir()
        if path.is_file()
        and path.suffix not in _SKIPPED_SUFFIXES
        and path.name not in _SKIPPED_NAMES
    )
    digest = hashlib.sha1(usedforsecurity=False)
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    revision = digest.hexdigest()
    repo = hub_dir / f"models--{spec.hf_name.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        staging = repo / "snapshots" / f".{revision}.{uuid.uuid4().hex}.tmp"
        staging.mkdir(parents=True)
        for path in files:
            # Copy contents only: the model cache's files are read-only, the hub cache's are not.
            shutil.copyfile(path, staging / path.name)
        try:
            staging.rename(snapshot)
        except OSError:  # another publisher finished first with the same files
            shutil.rmtree(staging, ignore_errors=True)
    refs = repo / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    pending_ref = refs / f".main.{uuid.uuid4().hex}.tmp"
    pending_ref.write_text(revision)
    pending_ref.replace(refs / "main")
    return snapshot
