"""Sampler snapshots on disk: full HF weights, PEFT adapters, and XOR deltas between snapshots.

A snapshot directory is what a deployment hotloads. Every snapshot has
`snapshot.json` (type, identity = directory name, dtype) and the `COMPLETE` marker. `base` and
`merged_base` hold an HF-loadable model (`config.json`, `model.safetensors`, tokenizer files);
a LoRA snapshot holds `adapter_config.json` + `adapter_model.safetensors`; a `delta` holds
`delta.safetensors`: per tensor, the XOR of the raw bit patterns of the new weights against the
previous snapshot's (same dtype), plus one Adler-32 checksum per reconstructed tensor so the
receiver can prove it applied the delta to the right base.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from backend.trainer.atomic import MARKER_NAME, atomic_directory, verify_complete
from backend.trainer.errors import UserError
from backend.trainer.safetensors_writer import save_hashed

SNAPSHOT_META = "snapshot.json"
WEIGHTS_FILE = "model.safetensors"
DELTA_FILE = "delta.safetensors"
CHECKSUM_FORMAT = "adler32"
_BITS_DTYPE = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files of a model directory that a snapshot carries along so it loads on its own.
_SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt")
_SKIPPED_NAMES = ("config.json", MARKER_NAME, SNAPSHOT_META)
# Threads computing Adler-32 checksums (zlib releases the GIL on large buffers).
_CHECKSUM_THREADS = 2

Tensors = dict[str, torch.Tensor]
# Writes the model-specific files of a snapshot into the temporary directory.
Writer = Callable[[Path], None]


def write_snapshot(
    directory: Path, meta: Mapping[str, Any], write: Writer, *, overwrite: bool = False
) -> None:
    """Write a snapshot atomically: the caller's files, then `snapshot.json`, then the marker."""
    with atomic_directory(directory, overwrite=overwrite) as tmp_dir:
        write(tmp_dir)
        full_meta = {"identity": directory.name, **meta}
        (tmp_dir / SNAPSHOT_META).write_text(json.dumps(full_meta, indent=1, sort_keys=True))


def write_full_weights(tmp_dir: Path, weights: Tensors, config_json: str, model_dir: Path) -> None:
    """An HF model directory: weights, the given config and the base model's tokenizer files.
    The weights are hashed as they are written (the marker does not read them back)."""
    save_hashed(weights, tmp_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    write_model_files(tmp_dir, config_json, model_dir)


def write_delta_weights(tmp_dir: Path, weights: Tensors, config_json: str, model_dir: Path) -> None:
    """A delta directory: the XOR tensors plus the files needed to materialise a full model
    (hashed as they are written, like full weights)."""
    save_hashed(weights, tmp_dir / DELTA_FILE)
    write_model_files(tmp_dir, config_json, model_dir)


def write_model_files(tmp_dir: Path, config_json: str, model_dir: Path) -> None:
    """`config.json` and every non-weight file of `model_dir` (tokenizer, generation config)."""
    (tmp_dir / "config.json").write_text(config_json)
    for path in sorted(model_dir.iterdir()):
        skipped = path.name in _SKIPPED_NAMES or path.name.endswith(_SKIPPED_SUFFIXES)
        if path.is_file() and not skipped:
            shutil.copyfile(path, tmp_dir / path.name)


def xor_delta(new: Tensors, previous: Tensors, *, in_place: bool = False) -> Tensors:
    """Per tensor, new XOR previous over the raw bits; both sides must match in names and dtype.

    `in_place` writes the result over `previous`'s tensors, which the caller must own (no
    model-sized allocation; `previous` no longer holds its weights afterwards, even on error).
    """
    if new.keys() != previous.keys():
        missing = sorted(new.keys() ^ previous.keys())[:3]
        raise UserError(f"previous snapshot has different tensors (e.g. {missing}); save a base")
    delta: Tensors = {}
    for name, tensor in new.items():
        base = previous[name]
        if base.dtype != tensor.dtype or base.shape != tensor.shape:
            raise UserError(
                f"previous snapshot tensor {name} is {base.dtype} {list(base.shape)}, "
                f"expected {tensor.dtype} {list(tensor.shape)}; save a base snapshot"
            )
        if in_place:
            delta[name] = torch.bitwise_xor(_bits(tensor), _bits(base), out=_bits(base))
        else:
            delta[name] = torch.bitwise_xor(_bits(tensor), _bits(base))
    return delta


def delta_meta(tensors: Tensors, previous_identity: str) -> dict[str, Any]:
    """The `snapshot.json` fields of a delta: its base and the reconstructed tensors' checksums."""
    return {
        "format": "xor_delta",
        "previous_snapshot_identity": previous_identity,
        "checksum_format": CHECKSUM_FORMAT,
        "checksums": checksums(tensors),
    }


def checksums(tensors: Tensors) -> dict[str, int]:
    """Adler-32 (`zlib.adler32`) of each tensor's raw bytes, computed on a few threads."""
    names = sorted(tensors)
    with ThreadPoolExecutor(_CHECKSUM_THREADS, thread_name_prefix="adler32") as pool:
        return dict(zip(names, pool.map(_adler32, [tensors[n] for n in names]), strict=True))


def apply_delta_tensors(
    previous: Tensors, delta_dir: Path, meta: Mapping[str, Any], out: Tensors | None = None
) -> Tensors:
    """Reconstruct a delta snapshot's tensors from its base's tensors, verifying checksums.

    `meta` is the delta's `snapshot.json` as `read_snapshot_meta` returned it (having verified
    the files, which is not repeated here). A tensor of `out` with the base tensor's dtype and
    shape receives the result in place (a model's detached weights: no model-sized allocation).
    """
    if meta.get("checkpoint_type") != "delta":
        raise UserError(f"{delta_dir} is not a delta snapshot")
    dtype = _dtype(meta["dtype"], delta_dir)
    delta = load_file(delta_dir / DELTA_FILE)
    if delta.keys() != previous.keys():
        raise UserError(f"delta {delta_dir} does not match its base's tensor names")
    restored: Tensors = {}
    for name, bits in delta.items():
        base = previous[name]
        if base.dtype != dtype or base.shape != bits.shape:
            raise UserError(f"delta {delta_dir}: base tensor {name} has the wrong dtype or shape")
        restored[name] = _xor(bits, base, (out or {}).get(name))
    actual = checksums(restored)
    for name in delta:
        if actual[name] != meta["checksums"][name]:
            raise UserError(
                f"delta {delta_dir}: tensor {name} fails its Adler-32 check; the base is not "
                f"snapshot {meta['previous_snapshot_identity']!r}"
            )
    return restored


def apply_delta(base_dir: Path, delta_dir: Path, out_dir: Path) -> Path:
    """Materialise `delta_dir` on top of the full snapshot `base_dir` into `out_dir`.

    `base_dir` must be a full snapshot (base, merged_base or an earlier reconstruction) whose
    identity is the delta's `previous_snapshot_identity`. `out_dir` becomes a full snapshot with
    the delta's identity, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    delta_meta = read_snapshot_meta(delta_dir)
    base_meta = read_snapshot_meta(base_dir)
    expected = delta_meta.get("previous_snapshot_identity")
    if base_meta.get("identity") != expected:
        raise UserError(
            f"delta {delta_dir.name!r} applies to snapshot {expected!r}, "
            f"not {base_meta.get('identity')!r}"
        )
    restored = apply_delta_tensors(load_full_tensors(base_dir), delta_dir, delta_meta)
    kept = ("identity", "dtype", "base_model", "step")
    meta = {key: delta_meta[key] for key in kept if key in delta_meta}
    meta.update(checkpoint_type="base", reconstructed_from=expected)
    config_json = (delta_dir / "config.json").read_text()
    write_snapshot(
        out_dir, meta, lambda tmp_dir: write_full_weights(tmp_dir, restored, config_json, delta_dir)
    )
    return out_dir


def load_snapshot_tensors(directory: Path) -> Tensors:
    """The full tensors of any full-parameter snapshot; a delta is rebuilt along its chain of
    sibling directories (`<parent>/<previous identity>`)."""
    meta = read_snapshot_meta(directory)
    if meta.get("checkpoint_type") != "delta":
        return load_full_tensors(directory)
    previous_dir = directory.parent / str(meta["previous_snapshot_identity"])
    return apply_delta_tensors(load_snapshot_tensors(previous_dir), directory, meta)


def load_full_tensors(directory: Path) -> Tensors:
    if not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"snapshot {directory} holds no full weights ({WEIGHTS_FILE})")
    return load_file(directory / WEIGHTS_FILE)


def read_snapshot_meta(directory: Path, *, verify: bool = True) -> dict[str, Any]:
    """`snapshot.json` of a complete snapshot directory (`UserError` if incomplete or foreign).

    `verify=False` skips the files' digests, for a caller that runs `verify_complete` alongside
    and uses nothing it builds from the snapshot before that succeeds.
    """
    if verify:
        verify_complete(directory)
    try:
        meta = json.loads((directory / SNAPSHOT_META).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory} is not a sampler snapshot: {exc}") from exc
    if not isinstance(meta, dict):
        raise UserError(f"{directory}/{SNAPSHOT_META} is not an object")
    return meta


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise UserError(f"export dtype {dtype} is not supported; use float32 or bfloat16")
    return _DTYPE_NAMES[dtype]


def _dtype(name: str, where: Path) -> torch.dtype:
    for dtype, dtype_str in _DTYPE_NAMES.items():
        if dtype_str == name:
            return dtype
    raise UserError(f"{where}: unknown snapshot dtype {name!r}")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(_BITS_DTYPE[tensor.dtype])


def _xor(bits: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`bits` XOR `base`'s bits, as `base`'s dtype; written into `out` when it fits."""
    if out is None or not out.is_contiguous():
        return torch.bitwise_xor(bits, _bits(base)).view(base.dtype)
    if (out.dtype, out.shape, out.device) != (base.dtype, base.shape, bits.device):
        return torch.bitwise_xor(bits, _bits(base)).view(base.dtype)
    torch.bitwise_xor(bits, _bits(base), out=_bits(out))
    return out


def _adler32(tensor: torch.Tensor) -> int:
    # The array's buffer (`.data`), not `tobytes()`: no copy of the tensor (0.3 s per 540 MB).
    return zlib.adler32(tensor.contiguous().view(torch.uint8).numpy().data)
