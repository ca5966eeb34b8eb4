"""`TrainableModel` on the tiny model: learning, batching, accumulation, normalisation, clipping,
resume determinism, atomic checkpoints, sampler exports and the user errors of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from backend.models.tiny import tiny_config
from backend.trainer.atomic import MARKER_NAME, atomic_directory
from backend.trainer.datum import Datum
from backend.trainer.engine import TrainableModel
from backend.trainer.errors import UserError
from backend.trainer.export import apply_delta, load_snapshot_tensors, read_snapshot_meta
from backend.trainer.settings import AdamSettings, LoraSettings

BASE = "fireloop/tiny"
# First AdamW step with lr = eps = 1e6 moves each weight by g·1e6/(|g| + 1e6) ≈ g: the weight
# change reads back the (normalised, clipped) gradient through the public API. Built without
# validation: the wire refuses such a learning rate, the engine applies whatever it is given.
READ_GRAD = AdamSettings.model_construct(learning_rate=1e6, eps=1e6)
FROZEN = AdamSettings(learning_rate=0.0)
TRAIN = AdamSettings(learning_rate=3e-3, weight_decay=0.01, grad_clip_norm=1.0)


def make_model(tiny_dir: Path, lora: LoraSettings | None = None, **kwargs: Any) -> TrainableModel:
    return TrainableModel(tiny_dir, base_model=BASE, lora=lora, **kwargs)


def sft_datum(ids: list[int], prompt_len: int = 0) -> Datum:
    """Next-token prediction over `ids`; the first `prompt_len` targets carry zero weight."""
    n = len(ids) - 1
    weights = torch.tensor([0.0 if t < prompt_len else 1.0 for t in range(n)])
    inputs = {"target_tokens": torch.tensor(ids[1:]), "weights": weights}
    return Datum(tokens=ids[:-1], loss_fn_inputs=inputs)


def random_batch(seed: int, lengths: list[int]) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    return [
        sft_datum(torch.randint(0, 256, (n + 1,), generator=generator).tolist(), prompt_len=2)
        for n in lengths
    ]


def grad_via_step(model: TrainableModel, **kwargs: Any) -> dict[str, torch.Tensor]:
    before = model.trainable_weights()
    model.optim_step(kwargs.pop("adam", READ_GRAD), **kwargs)
    after = model.trainable_weights()
    return {name: before[name] - after[name] for name in before}


def global_norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors.values()])))


def train(model: TrainableModel, steps: int, seed: int = 0) -> list[float]:
    losses = []
    for step in range(steps):
        result = model.forward_backward(
            random_batch(seed + step, [24, 17, 30]), "cross_entropy", {}
        )
        model.optim_step(TRAIN, "num_loss_tokens")
        losses.append(result.metrics["loss:sum"])
    return losses


@pytest.fixture(scope="module")
def shared_model(tiny_dir: Path) -> TrainableModel:
    """A model that tests only read (forward, rejected requests)."""
    return make_model(tiny_dir)


@pytest.mark.parametrize("lora", [None, LoraSettings(rank=8)], ids=["full", "lora"])
def test_loss_falls_on_a_fixed_batch(tiny_dir: Path, lora: LoraSettings | None) -> None:
    model = make_model(tiny_dir, lora)
    batch = random_batch(0, [32] * 8)
    adam = AdamSettings(learning_rate=1e-2 if lora else 3e-3)
    losses = []
    for _ in range(12):
        losses.append(model.forward_backward(batch, "cross_entropy", None).metrics["loss:sum"])
        model.optim_step(adam, "num_loss_tokens")
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.step == 12


def test_batched_forward_matches_per_datum_and_is_deterministic(
    shared_model: TrainableModel, tiny_dir: Path
) -> None:
    batch = random_batch(1, [5, 17, 9, 17])
    together = shared_model.forward(batch, "cross_entropy", None)
    for datum, lp_N in zip(batch, together.logprobs, strict=True):
        alone = shared_model.forward([datum], "cross_entropy", None).logprobs[0]
        torch.testing.assert_close(lp_N, alone, rtol=0, atol=1e-5)
        assert lp_N.shape == (datum.num_tokens,) and lp_N.dtype == torch.float32
    again = shared_model.forward(batch, "cross_entropy", None)
    assert all(torch.equal(a, b) for a, b in zip(together.logprobs, again.logprobs, strict=True))
    # Micro-batches under a small token budget give the same numbers (up to fp32 rounding).
    small = make_model(tiny_dir, max_batch_tokens=20).forward(batch, "cross_entropy", None)
    for a, b in zip(together.logprobs, small.logprobs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_forward_and_forward_backward_see_identical_logprobs(tiny_dir: Path) -> None:
    # The custom-loss mechanism compares phase 1 (forward) with phase 2 (forward_backward).
    model = make_model(tiny_dir)
    batch = random_batch(2, [12, 7])
    phase1 = model.forward(batch, "cross_entropy", None)
    phase2 = model.forward_backward(batch, "cross_entropy", None)
    assert all(torch.equal(a, b) for a, b in zip(phase1.logprobs, phase2.logprobs, strict=True))


def test_metrics_use_name_reduction_keys(shared_model: TrainableModel) -> None:
    batch = random_batch(3, [10, 6])
    result = shared_model.forward(batch, "cross_entropy", None)
    assert result.metrics["num_tokens:sum"] == 16
    assert result.metrics["num_loss_tokens:sum"] == 12  # two prompt targets per datum weigh 0
    assert result.metrics["num_sequences:sum"] == 2
    expected = -sum(
        float((lp * d.loss_fn_inputs["weights"]).sum())
        for lp, d in zip(result.logprobs, batch, strict=True)
    )
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    # An RL loss against the current logprobs: every ratio is exactly 1, nothing clipped.
    rl_batch = [
        Datum(
            tokens=d.tokens,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "logprobs": lp,
                "advantages": torch.linspace(-1, 1, d.num_tokens),
            },
        )
        for d, lp in zip(batch, result.logprobs, strict=True)
    ]
    ppo = shared_model.forward(rl_batch, "ppo", {"clip_high_threshold": 1.3})
    assert ppo.metrics["ratio_mean:mean"] == pytest.approx(1.0, abs=1e-6)
    assert ppo.metrics["clip_frac:mean"] == 0.0
    assert all(key.count(":") == 1 for key in ppo.metrics)


def test_gradients_accumulate_across_calls(tiny_dir: Path) -> None:
    batch = random_batch(4, [20, 11])
    split, joint = make_model(tiny_dir), make_model(tiny_dir)
    split.forward_backward(batch[:1], "cross_entropy", None)
    split.forward_backward(batch[1:], "cross_entropy", None)
    joint.forward_backward(batch, "cross_entropy", None)
    split_grads, joint_grads = grad_via_step(split), grad_via_step(joint)
    assert global_norm(joint_grads) > 1e-3
    for name, grad in joint_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_normalisation_divides_by_loss_tokens_or_sequences(tiny_dir: Path) -> None:
    model = make_model(tiny_dir)
    batch = random_batch(5, [20, 11, 15])  # 40 loss tokens (2 prompt targets each), 3 sequences
    norms = {}
    for mode in ("none", "num_loss_tokens", "num_sequences"):
        model.forward_backward(batch, "cross_entropy", None)
        metrics = model.optim_step(FROZEN, mode)  # lr 0: same weights, same gradient each time
        norms[mode] = metrics["grad_norm:mean"]
        assert metrics["num_loss_tokens:sum"] == 40
    assert norms["num_loss_tokens"] == pytest.approx(norms["none"] / 40, rel=1e-5)
    assert norms["num_sequences"] == pytest.approx(norms["none"] / 3, rel=1e-5)
    model.forward_backward(batch, "cross_entropy", None)
    assert model.optim_step(FROZEN, None)["grad_norm:mean"] == pytest.approx(norms["none"])


def test_grad_clipping_caps_the_norm_and_reports_the_pre_clip_norm(tiny_dir: Path) -> None:
    batch = random_batch(6, [25, 25])
    reference, clipped = make_model(tiny_dir), make_model(tiny_dir)
    reference.forward_backward(batch, "cross_entropy", None)
    unclipped = reference.optim_step(FROZEN)["grad_norm:mean"]
    cap = unclipped / 4
    clipped.forward_backward(batch, "cross_entropy", None)
    before = clipped.trainable_weights()
    metrics = clipped.optim_step(READ_GRAD.model_copy(update={"grad_clip_norm": cap}))
    applied = {n: before[n] - w for n, w in clipped.trainable_weights().items()}
    assert metrics["grad_norm:mean"] == pytest.approx(unclipped, rel=1e-6)
    assert global_norm(applied) == pytest.approx(cap, rel=1e-3)


@pytest.mark.parametrize("lora", [None, LoraSettings(rank=4, seed=3)], ids=["full", "lora"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(
    tiny_dir: Path, tmp_path: Path, lora: LoraSettings | None
) -> None:
    straight = make_model(tiny_dir, lora)
    train(straight, 2)
    straight.save_state(tmp_path / "step-2")
    expected_losses = train(straight, 3, seed=2)

    resumed = make_model(tiny_dir, lora)
    resumed.forward_backward(random_batch(99, [9]), "cross_entropy", None)  # discarded by load
    resumed.load_state(tmp_path / "step-2", with_optimizer=True)
    assert resumed.step == 2
    assert train(resumed, 3, seed=2) == expected_losses
    for name, weight in straight.trainable_weights().items():
        assert torch.equal(resumed.trainable_weights()[name], weight), name

    fresh_optimizer = make_model(tiny_dir, lora)
    fresh_optimizer.load_state(tmp_path / "step-2", with_optimizer=False)
    losses = train(fresh_optimizer, 3, seed=2)
    assert losses[0] == expected_losses[0]  # same weights before the first step
    assert losses[1:] != expected_losses[1:]


def test_incomplete_or_corrupt_checkpoints_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    model = make_model(tiny_dir)
    model.save_state(tmp_path / "good")
    with pytest.raises(UserError, match="already exists"):
        model.save_state(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "unmarked")
    (tmp_path / "unmarked" / MARKER_NAME).unlink()
    with pytest.raises(UserError, match="incomplete"):
        model.load_state(tmp_path / "unmarked", with_optimizer=True)
    shutil.copytree(tmp_path / "good", tmp_path / "tampered")
    weights = tmp_path / "tampered" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        model.load_state(tmp_path / "tampered", with_optimizer=False)
    # A write that fails midway leaves neither the final nor the temporary directory behind.
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "crashed") as tmp_dir:
        (tmp_dir / "weights.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "tampered", "unmarked"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_chain_reconstructs_the_base_export_bit_exactly(
    tiny_dir: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    model = make_model(tiny_dir)
    snapshots = tmp_path / "snapshots"
    model.export_for_sampler(snapshots / "s0", "base", export_dtype=dtype)
    train(model, 1)
    model.export_for_sampler(snapshots / "s1", "delta", snapshots / "s0", export_dtype=dtype)
    train(model, 1, seed=1)
    model.export_for_sampler(snapshots / "s2", "delta", snapshots / "s1", export_dtype=dtype)
    model.export_for_sampler(snapshots / "b2", "base", export_dtype=dtype)
    meta = read_snapshot_meta(snapshots / "s2")
    assert meta["previous_snapshot_identity"] == "s1"
    assert meta["checksum_format"] == "adler32"

    apply_delta(snapshots / "s0", snapshots / "s1", tmp_path / "r1")
    apply_delta(tmp_path / "r1", snapshots / "s2", tmp_path / "r2")
    expected = load_file(snapshots / "b2" / "model.safetensors")
    restored = load_file(tmp_path / "r2" / "model.safetensors")
    assert expected.keys() == restored.keys()
    assert all(
        torch.equal(restored[k], v) and restored[k].dtype == dtype for k, v in expected.items()
    )
    chained = load_snapshot_tensors(snapshots / "s2")  # rebuilt along the sibling chain
    assert all(torch.equal(chained[k], v) for k, v in expected.items())
    with pytest.raises(UserError, match="applies to snapshot 's1'"):
        apply_delta(snapshots / "s0", snapshots / "s2", tmp_path / "wrong")
    # A delta against an older snapshot than the cached one is computed from disk.
    model.export_for_sampler(snapshots / "s3", "delta", snapshots / "s0", export_dtype=dtype)
    apply_delta(snapshots / "s0", snapshots / "s3", tmp_path / "r3")
    restored3 = load_file(tmp_path / "r3" / "model.safetensors")
    assert all(torch.equal(restored3[k], v) for k, v in expected.items())


def test_a_failed_delta_export_leaves_the_next_delta_exact(tiny_dir: Path, tmp_path: Path) -> None:
    model = make_model(tiny_dir)
    snapshots = tmp_path / "snapshots"
    model.export_for_sampler(snapshots / "s0", "base")
    train(model, 1)
    (snapshots / "taken").mkdir()
    # The XOR overwrites the cached export of s0 before the write is refused.
    with pytest.raises(UserError, match="already exists"):
        model.export_for_sampler(snapshots / "taken", "delta", snapshots / "s0")
    model.export_for_sampler(snapshots / "s1", "delta", snapshots / "s0")
    model.export_for_sampler(snapshots / "b1", "base")
    expected = load_file(snapshots / "b1" / "model.safetensors")
    restored = load_snapshot_tensors(snapshots / "s1")
    assert expected.keys() == restored.keys()
    assert all(torch.equal(restored[k], v) for k, v in expected.items())


def test_exported_full_weights_load_in_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    model = make_model(tiny_dir)
    train(model, 2)
    model.export_for_sampler(tmp_path / "snap", "base")
    assert_same_logprobs(model, tmp_path / "snap")


def test_merged_base_and_adapter_match_the_lora_model(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model = make_model(tiny_dir, LoraSettings(rank=4, alpha=16))
    train(model, 3)
    model.export_for_sampler(tmp_path / "merged", "merged_base")
    assert_same_logprobs(model, tmp_path / "merged")
    model.export_for_sampler(tmp_path / "adapter", "base")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert_same_logprobs(model, served)


def test_load_adapter_restores_exported_lora_weights(tiny_dir: Path, tmp_path: Path) -> None:
    lora = LoraSettings(rank=4, alpha=16)
    trained = make_model(tiny_dir, lora)
    train(trained, 2)
    trained.export_for_sampler(tmp_path / "adapter", "base")
    fresh = make_model(tiny_dir, lora)
    fresh.load_adapter(tmp_path / "adapter")
    for name, weight in trained.trainable_weights().items():
        assert torch.equal(fresh.trainable_weights()[name], weight), name
    with pytest.raises(UserError, match=r"rank 4, alpha 16; this model has rank 8, alpha 16"):
        make_model(tiny_dir, LoraSettings(rank=8, alpha=16)).load_adapter(tmp_path / "adapter")
    with pytest.raises(UserError, match="other modules"):
        make_model(tiny_dir, LoraSettings(rank=4, alpha=16, train_mlp=False)).load_adapter(
            tmp_path / "adapter"
        )
    with pytest.raises(UserError, match="needs a LoRA model"):
        make_model(tiny_dir).load_adapter(tmp_path / "adapter")


def assert_same_logprobs(model: TrainableModel, served: Path | torch.nn.Module) -> None:
    if isinstance(served, Path):
        served = AutoModelForCausalLM.from_pretrained(served, dtype=torch.float32)
    datum = random_batch(7, [21])[0]
    expected_N = model.forward([datum], "cross_entropy", None).logprobs[0]
    with torch.no_grad():
        logits = served(input_ids=torch.tensor([datum.tokens])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    actual_N = logprobs.gather(-1, datum.loss_fn_inputs["target_tokens"][:, None])[:, 0]
    torch.testing.assert_close(actual_N, expected_N, rtol=0, atol=1e-5)


def test_lora_targets_follow_the_flags_and_tying(tiny_dir: Path, tmp_path: Path) -> None:
    tied = make_model(tiny_dir, LoraSettings(rank=2, train_mlp=False)).trainable_weights()
    assert any("q_proj" in n for n in tied) and not any("gate_proj" in n for n in tied)
    assert not any("lm_head" in n for n in tied)  # tied embeddings: no LoRA on lm_head
    config = tiny_config()
    config.tie_word_embeddings = False
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "untied")
    untied = TrainableModel(tmp_path / "untied", base_model="untied", lora=LoraSettings(rank=2))
    assert any("lm_head.lora_A" in n for n in untied.trainable_weights())
    assert untied.lora_rank == 2 and untied.is_lora
    with pytest.raises(UserError, match="trains nothing"):
        make_model(tiny_dir, LoraSettings(rank=2, train_attn=False, train_mlp=False))


def _with_input(datum: Datum, key: str, value: torch.Tensor | None) -> Datum:
    inputs = dict(datum.loss_fn_inputs)
    if value is None:
        del inputs[key]
    else:
        inputs[key] = value
    return Datum(tokens=datum.tokens, loss_fn_inputs=inputs)


GOOD = sft_datum(list(range(10, 20)))
BAD_INPUTS = [
    (
        "weights_length",
        [GOOD, _with_input(GOOD, "weights", torch.ones(8))],
        "cross_entropy",
        r"data\[1\]\.loss_fn_inputs\.weights has shape \[8\], expected \[9\]",
    ),
    (
        "token_id",
        [
            Datum(
                [1, 259],
                GOOD.loss_fn_inputs
                | {"target_tokens": torch.tensor([2, 3]), "weights": torch.ones(2)},
            )
        ],
        "cross_entropy",
        r"data\[0\]\.model_input\.tokens must be in \[0, 259\)",
    ),
    (
        "target_id",
        [_with_input(GOOD, "target_tokens", torch.full((9,), 300))],
        "cross_entropy",
        r"data\[0\]\.loss_fn_inputs\.target_tokens must be in \[0, 259\)",
    ),
    (
        "too_long",
        [sft_datum([1] * 258)],
        "cross_entropy",
        r"data\[0\]\.model_input has 257 tokens, more than the model context of 256",
    ),
    (
        "no_targets",
        [_with_input(GOOD, "target_tokens", None)],
        "cross_entropy",
        r"data\[0\]\.loss_fn_inputs\.target_tokens is required",
    ),
    (
        "no_advantages",
        [_with_input(GOOD, "logprobs", torch.zeros(9))],
        "ppo",
        r"data\[0\]\.loss_fn_inputs\.advantages is required by loss 'ppo'",
    ),
    ("unknown_loss", [GOOD], "sft", r"unknown loss_fn 'sft'"),
    ("empty", [], "cross_entropy", r"at least one datum"),
]


@pytest.mark.parametrize(
    ("datums", "loss_fn", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_a_user_error_and_changes_nothing(
    tiny_dir: Path, datums: list[Datum], loss_fn: str, message: str
) -> None:
    model = make_model(tiny_dir)
    with pytest.raises(UserError, match=message):
        model.forward_backward(datums, loss_fn, None)
    assert model.optim_step(FROZEN)["num_loss_tokens:sum"] == 0


def test_base_only_model_is_forward_only(tiny_dir: Path, tmp_path: Path) -> None:
    reference = make_model(tiny_dir, base_only=True)
    assert reference.num_trainable_params == 0
    assert reference.forward([GOOD], "cross_entropy", None).metrics["num_tokens:sum"] == 9
    with pytest.raises(UserError, match="base_only"):
        reference.forward_backward([GOOD], "cross_entropy", None)
    with pytest.raises(UserError, match="base_only"):
        reference.optim_step(TRAIN)
    with pytest.raises(UserError, match="lora_config must be absent"):
        make_model(tiny_dir, LoraSettings(rank=2), base_only=True)


def test_state_of_another_shape_or_model_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    make_model(tiny_dir, LoraSettings(rank=4)).save_state(tmp_path / "lora4")
    with pytest.raises(UserError, match=r"holds LoRA \(rank 4.*this model is full-parameter"):
        make_model(tiny_dir).load_state(tmp_path / "lora4", with_optimizer=True)
    with pytest.raises(UserError, match=r"rank 4.*this model is LoRA \(rank 8"):
        make_model(tiny_dir, LoraSettings(rank=8)).load_state(
            tmp_path / "lora4", with_optimizer=False
        )
    other = TrainableModel(tiny_dir, base_model="fireloop/other", lora=LoraSettings(rank=4))
    with pytest.raises(UserError, match="'fireloop/tiny', this model is 'fireloop/other'"):
        other.load_state(tmp_path / "lora4", with_optimizer=True)
    full = make_model(tiny_dir)
    with pytest.raises(UserError, match="merged_base"):
        full.export_for_sampler(tmp_path / "m", "merged_base")
    with pytest.raises(UserError, match="needs the previous"):
        full.export_for_sampler(tmp_path / "d", "delta")
