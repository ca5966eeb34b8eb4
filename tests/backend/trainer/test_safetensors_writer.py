"""The one-pass safetensors writer: files safetensors itself reads back exactly, a digest equal to
the file's SHA-256 however the bytes are chunked, and markers that take such digests as given."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from backend.trainer.atomic import (
    MARKER_NAME,
    atomic_directory,
    record_digest,
    verify_complete,
    write_marker,
)
from backend.trainer.errors import UserError
from backend.trainer.safetensors_writer import save_hashed


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=generator)
    return {
        "b.weight": weight,
        "a.transposed": weight.t(),  # not contiguous: written in its logical order
        "c.bf16": torch.randn(3, 4, generator=generator).to(torch.bfloat16),
        "d.fp16": torch.randn(9, generator=generator).to(torch.float16),
        "e.bits32": torch.randint(-(2**31), 2**31 - 1, (6,), dtype=torch.int32),
        "f.bits16": torch.randint(-(2**15), 2**15 - 1, (2, 3), dtype=torch.int16),
        "g.scalar": torch.tensor(1.5),
        "h.empty": torch.zeros(0, 4),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("chunk_bytes", [1 << 24, 16, 3])
def test_safetensors_reads_back_every_tensor_and_the_digest_is_the_files(
    tmp_path: Path, chunk_bytes: int
) -> None:
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    digest = save_hashed(tensors, path, metadata={"format": "pt"}, chunk_bytes=chunk_bytes)
    assert digest == _sha256(path)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(path, framework="pt") as opened:
        assert opened.metadata() == {"format": "pt"}


def test_the_header_is_aligned_for_the_tensors_after_it(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_hashed({"w": torch.ones(3)}, path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header == {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}


def test_an_unsupported_tensor_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tensor z: torch\.complex64"):
        save_hashed({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")


def test_the_marker_takes_a_declared_digest_instead_of_reading_the_file(tmp_path: Path) -> None:
    final_dir = tmp_path / "snap"
    with atomic_directory(final_dir) as tmp_dir:
        save_hashed({"w": torch.ones(4)}, tmp_dir / "w.safetensors")
        (tmp_dir / "config.json").write_text("{}")
        # A declared digest is listed as given, unread: a wrong one is only caught by readers.
        record_digest(tmp_dir / "config.json", "f" * 64)
    with pytest.raises(UserError, match=r"config\.json fails its SHA-256 check"):
        verify_complete(final_dir)
    listed = json.loads((final_dir / MARKER_NAME).read_text())["files"]
    assert listed["w.safetensors"]["sha256"] == _sha256(final_dir / "w.safetensors")


def test_a_digest_declared_outside_a_save_is_ignored(tmp_path: Path) -> None:
    final_dir = tmp_path / "snap"
    record_digest(tmp_path / "stray" / "config.json", "f" * 64)  # no save there: dropped
    with atomic_directory(final_dir) as tmp_dir:
        (tmp_dir / "config.json").write_text("{}")
    verify_complete(final_dir)
    listed = json.loads((final_dir / MARKER_NAME).read_text())["files"]
    assert listed["config.json"]["sha256"] == _sha256(final_dir / "config.json")


def test_a_wrong_given_digest_is_caught_by_the_reader(tmp_path: Path) -> None:
    # The marker trusts the writer's digest; a reader still checks it against the bytes.
    (tmp_path / "w").write_bytes(b"weights")
    write_marker(tmp_path, {"w": hashlib.sha256(b"other").hexdigest()})
    with pytest.raises(UserError, match="w fails its SHA-256 check"):
        verify_complete(tmp_path)


def test_a_digest_for_a_file_that_is_not_there_is_refused(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"missing\.bin"):
        write_marker(tmp_path, {"missing.bin": "0" * 64})
