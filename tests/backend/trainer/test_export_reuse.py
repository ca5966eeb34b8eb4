"""Sampler snapshots copy the weights into the memory of an earlier export (no fresh model-sized
allocation per save); the files must stay byte-for-byte what a fresh copy would write."""

from __future__ import annotations

from pathlib import Path

import torch

from backend.trainer import modeling
from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel
from backend.trainer.export import load_snapshot_tensors
from backend.trainer.settings import AdamSettings

TRAIN = AdamSettings(learning_rate=3e-3, weight_decay=0.01, grad_clip_norm=1.0)


def batch(seed: int) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    datums = []
    for n in (24, 17):
        ids = torch.randint(0, 256, (n + 1,), generator=generator)
        inputs = {"target_tokens": ids[1:], "weights": torch.ones(n)}
        datums.append(Datum(tokens=ids[:-1].tolist(), loss_fn_inputs=inputs))
    return datums


def step(model: TrainableModel, seed: int) -> None:
    model.forward_backward(batch(seed), "cross_entropy", {})
    model.optim_step(TRAIN, "num_loss_tokens")


def test_full_tensors_copies_into_matching_tensors_only() -> None:
    module = torch.nn.Linear(4, 3)
    first = modeling.full_tensors(module, torch.float32, merge_lora=False)
    with torch.no_grad():
        module.weight.add_(1.0)
    stale = {name: t.clone() for name, t in first.items()}
    again = modeling.full_tensors(module, torch.float32, merge_lora=False, into=first)
    assert all(again[n].data_ptr() == first[n].data_ptr() for n in first)  # reused
    assert torch.equal(again["weight"], module.weight.detach())
    assert not torch.equal(again["weight"], stale["weight"])
    # Another dtype (or shape) cannot be copied into: a fresh tensor, the offer left alone.
    halved = modeling.full_tensors(module, torch.bfloat16, merge_lora=False, into=first)
    assert halved["weight"].dtype == torch.bfloat16
    assert halved["weight"].data_ptr() != first["weight"].data_ptr()
    assert torch.equal(halved["weight"], module.weight.detach().to(torch.bfloat16))
    assert torch.equal(first["weight"], module.weight.detach())


def test_reused_export_memory_writes_the_bytes_of_a_fresh_export(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # Two identically trained models (CPU training is bitwise reproducible at a fixed thread
    # count): one saves a long chain, so its later saves reuse memory; the other saves once.
    chained = TrainableModel(tiny_dir, base_model="fireloop/tiny")
    fresh = TrainableModel(tiny_dir, base_model="fireloop/tiny")
    snaps = tmp_path / "snaps"
    chained.export_for_sampler(snaps / "s0", "base")
    previous = "s0"
    for seed, name in enumerate(["s1", "s2", "s3", "s4"]):
        step(chained, seed)
        step(fresh, seed)
        chained.export_for_sampler(snaps / name, "delta", snaps / previous)
        previous = name
    # A dtype switch in between: nothing of the wrong dtype is copied into.
    chained.export_for_sampler(snaps / "h4", "base", export_dtype=torch.bfloat16)
    chained.export_for_sampler(snaps / "b4", "base")
    fresh.export_for_sampler(tmp_path / "f4", "base")
    fresh.export_for_sampler(tmp_path / "h4", "base", export_dtype=torch.bfloat16)
    weights = "model.safetensors"
    assert (snaps / "b4" / weights).read_bytes() == (tmp_path / "f4" / weights).read_bytes()
    assert (snaps / "h4" / weights).read_bytes() == (tmp_path / "h4" / weights).read_bytes()
    expected = load_snapshot_tensors(tmp_path / "f4")
    rebuilt = load_snapshot_tensors(snaps / "s4")  # s0 and four deltas, two over reused memory
    assert expected.keys() == rebuilt.keys()
    assert all(torch.equal(rebuilt[k], v) for k, v in expected.items())
    # A delta after the bf16 base is exact too (its previous export is the fp32 b4).
    step(chained, 9)
    step(fresh, 9)
    chained.export_for_sampler(snaps / "s5", "delta", snaps / "b4")
    fresh.export_for_sampler(tmp_path / "f5", "base")
    expected5 = load_snapshot_tensors(tmp_path / "f5")
    rebuilt5 = load_snapshot_tensors(snaps / "s5")
    assert all(torch.equal(rebuilt5[k], v) for k, v in expected5.items())
