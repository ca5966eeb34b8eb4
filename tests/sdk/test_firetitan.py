"""The Firetitan clients (tinker 0.23 underneath) against a real local platform and `tiny`.

Each test creates its own trainer job on one shared platform. What is asserted is what a
training loop relies on: the loss falls, a Python loss gives the built-in loss's update,
chunked submissions equal one chunk, snapshots get suffixed names and the right types, and a
run preempted and resumed from its checkpoint is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import pickle
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types
from tinker.lib import internal_client_holder
from tinker.lib._auth_token_provider import ApiKeyAuthProvider
from tinker.lib.public_interfaces import training_client as tinker_training_client

from backend import LocalPlatform
from sdk import (
    FiretitanServiceClient,
    FiretitanTrainingClient,
    GradAccNormalization,
    TrainerJobManager,
    qualify_snapshot_name,
    resolve_checkpoint_path,
)
from sdk.checkpoint_refs import logical_snapshot_name, make_cross_job_ref
from sdk.errors import BadRequestError, ConfigError, TrainerLostError, WaitTimeoutError
from tests.trainer_support import BATCH, FAST_TIMINGS, TrainerPlatform

logger = logging.getLogger(__name__)
ADAM = types.AdamParams(learning_rate=1e-2)
ANSWER_TOKENS = sum(1 for d in BATCH for w in d.loss_fn_inputs["weights"].data if w)


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


def _connect(tp: TrainerPlatform, job_id: str, lora_rank: int = 0) -> FiretitanServiceClient:
    return FiretitanServiceClient(tp.create_job(job_id, lora_rank=lora_rank), tp.api_key)


def _train(client: FiretitanTrainingClient, steps: int) -> list[float]:
    """`steps` optimizer steps on BATCH; the loss before each update."""
    losses = []
    for _ in range(steps):
        fwdbwd = client.forward_backward(BATCH, "cross_entropy")
        client.optim_step(ADAM, GradAccNormalization.NUM_LOSS_TOKENS).result()
        losses.append(fwdbwd.result().metrics["loss:sum"])
    return losses


def _logprobs(client: FiretitanTrainingClient) -> list[torch.Tensor]:
    output = client.forward(BATCH, "cross_entropy").result()
    return [torch.tensor(out["logprobs"].data) for out in output.loss_fn_outputs]


def _all_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _ce_loss(
    data: list[types.Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy written in Python: sum of -weight * logprob."""
    terms = [
        (-lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
        for d, lp in zip(data, logprobs, strict=True)
    ]
    loss = torch.stack(terms).sum()
    return loss, {"custom_ce:sum": loss.item()}


@pytest.mark.parametrize("lora_rank", [0, 8], ids=["full", "lora"])
def test_loss_falls_on_a_fixed_batch(tp: TrainerPlatform, lora_rank: int) -> None:
    with _connect(tp, f"falls-{lora_rank}", lora_rank) as service:
        client = service.create_training_client("tiny", lora_rank=lora_rank, lora_alpha=16)
        losses = _train(client, 6)
        metrics = client.forward_backward(BATCH, "cross_entropy").result().metrics
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics["response_tokens"] == ANSWER_TOKENS
    assert metrics["num_loss_tokens:sum"] == ANSWER_TOKENS


def test_custom_loss_gives_the_builtin_cross_entropy_update(tp: TrainerPlatform) -> None:
    with _connect(tp, "custom-loss") as service:
        # Two full-parameter models of the same base weights (seed only tells them apart).
        builtin = service.create_training_client("tiny", seed=1)
        custom = service.create_training_client("tiny", seed=2)
        builtin_out = builtin.forward_backward(BATCH, "cross_entropy").result()
        custom_out = custom.forward_backward_custom(BATCH, _ce_loss).result()
        builtin.optim_step(ADAM).result()
        custom.optim_step(ADAM).result()
        assert custom_out.metrics["custom_ce:sum"] == pytest.approx(
            builtin_out.metrics["loss:sum"], rel=1e-6
        )
        # Phase 2 sends weights = -dC/dlp = the CE weights exactly: the same gradient, bit for bit.
        assert _all_equal(_logprobs(builtin), _logprobs(custom))


def test_one_datum_chunks_submitted_out_of_order_equal_one_chunk(
    tp: TrainerPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _connect(tp, "chunks") as service:
        whole = service.create_training_client("tiny", seed=1)
        chunked = service.create_training_client("tiny", seed=2)
        one_chunk = whole.forward_backward(BATCH, "cross_entropy").result()
        # One datum per chunk: tinker submits chunks 2..4 concurrently, then chunk 1.
        monkeypatch.setattr(tinker_training_client, "MAX_CHUNK_LEN", 1)
        four_chunks = chunked.forward_backward(BATCH, "cross_entropy").result()
        monkeypatch.undo()
        for whole_out, chunk_out in zip(
            one_chunk.loss_fn_outputs, four_chunks.loss_fn_outputs, strict=True
        ):
            assert torch.allclose(
                torch.tensor(whole_out["logprobs"].data), torch.tensor(chunk_out["logprobs"].data)
            )
        assert four_chunks.metrics["loss:sum"] == pytest.approx(one_chunk.metrics["loss:sum"])
        assert four_chunks.metrics["response_tokens"] == ANSWER_TOKENS
        whole.optim_step(ADAM).result()
        chunked.optim_step(ADAM).result()
        for a, b in zip(_logprobs(whole), _logprobs(chunked), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_grad_accumulation_normalization_divides_by_loss_tokens(tp: TrainerPlatform) -> None:
    with _connect(tp, "normalize") as service:
        summed = service.create_training_client("tiny", seed=1)
        per_token = service.create_training_client("tiny", seed=2)
        summed.forward_backward(BATCH, "cross_entropy").result()
        per_token.forward_backward(BATCH, "cross_entropy").result()
        raw = summed.optim_step(ADAM, "none").result().metrics
        normalized = (
            per_token.optim_step(
                ADAM, GradAccNormalization.NUM_LOSS_TOKENS, emit_grad_norm_metrics="basic"
            )
            .result()
            .metrics
        )
    assert raw is not None and normalized is not None
    assert normalized["num_loss_tokens:sum"] == ANSWER_TOKENS
    ratio = raw["grad_norm:mean"] / normalized["grad_norm:mean"]
    assert ratio == pytest.approx(ANSWER_TOKENS, rel=1e-4)


def test_resume_after_preemption_matches_an_uninterrupted_run(tp: TrainerPlatform) -> None:
    with _connect(tp, "resume-straight") as service:
        straight_client = service.create_training_client("tiny")
        straight = _train(straight_client, 4)
        straight_client.save_state("final", timeout=60)

    with _connect(tp, "resume-cut") as service:
        client = service.create_training_client("tiny")
        first = _train(client, 2)
        client.save_state("step-2", timeout=60)
        old_suffix = client.session_id
        tp.platform.preempt("resume-cut")
        assert client.list_checkpoints() == []  # the trainer is gone: [] and a warning
        with pytest.raises(TrainerLostError):  # the SDK's error, not tinker's 404
            client.forward(BATCH, "cross_entropy").result(timeout=30)

    manager = TrainerJobManager(tp.api_key, tp.platform.base_url)
    endpoint = manager.reconnect_and_wait(
        "resume-cut", poll_interval_s=0.05, transitional_poll_s=0.05
    )
    with FiretitanServiceClient(endpoint.base_url, tp.api_key) as service:
        client = service.create_training_client("tiny")
        assert client.session_id != old_suffix
        assert client.list_checkpoints() == ["step-2"]
        client.load_state_with_optimizer(client.resolve_checkpoint_path("step-2")).result()
        rest = _train(client, 2)
        client.save_state("final", timeout=60)

    assert first + rest == straight  # exact floats: same data, same order of operations
    for part in ("weights.safetensors", "optimizer.safetensors"):
        expected = load_file(tp.state_dir("resume-straight", "final") / part)
        resumed = load_file(tp.state_dir("resume-cut", "final") / part)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), part

    # Another job of the account continues from the same checkpoint by cross-job reference.
    with _connect(tp, "resume-elsewhere") as service:
        client = service.create_training_client("tiny")
        reference = client.resolve_checkpoint_path("step-2", source_job_id="resume-cut")
        assert reference == "cross_job://resume-cut/step-2"
        client.load_state_with_optimizer(reference).result()
        by_path = service.create_training_client("tiny", seed=5)  # weights only, absolute path
        by_path.load_state(str(tp.state_dir("resume-cut", "step-2"))).result()
        assert _all_equal(_logprobs(by_path), _logprobs(client))
        assert _train(client, 2) == straight[2:]


def test_a_trainer_preempted_mid_step_raises_the_sdks_lost_trainer_error(
    tp: TrainerPlatform,
) -> None:
    with _connect(tp, "lost-mid-step") as service:
        client = service.create_training_client("tiny")
        _train(client, 1)
        tp.platform.schedule_preemption([2])  # the job goes away in its second optimizer step
        client.forward_backward(BATCH, "cross_entropy").result(timeout=30)
        with pytest.raises(TrainerLostError) as lost:
            client.optim_step(ADAM).result(timeout=30)
        assert lost.value.retryable is False and lost.value.operation == "OptimStep"
        assert not isinstance(lost.value.__cause__, TrainerLostError)  # mapped once, at the edge
        clone = pickle.loads(pickle.dumps(lost.value))  # Prefect serializes failures
        assert (type(clone), str(clone)) == (TrainerLostError, str(lost.value))


def test_rl_losses_take_their_inputs_over_the_wire(tp: TrainerPlatform) -> None:
    with _connect(tp, "rl-losses") as service:
        client = service.create_training_client("tiny")
        old_logprobs = _logprobs(client)
        data = [
            types.Datum(
                model_input=d.model_input,
                loss_fn_inputs={
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "logprobs": types.TensorData.from_torch(lp),
                    "advantages": types.TensorData.from_torch(torch.ones_like(lp)),
                },
            )
            for d, lp in zip(BATCH, old_logprobs, strict=True)
        ]
        tokens = sum(len(lp) for lp in old_logprobs)
        logprob_sum = float(sum(lp.sum() for lp in old_logprobs))
        # At the sampling weights every ratio is 1 and every advantage is 1: ratio losses give
        # -sum(advantages); cispo and dro weigh the logprobs themselves.
        expected: dict[str, float] = {"importance_sampling": -tokens, "ppo": -tokens}
        expected |= {"dapo": -tokens}
        expected |= {"gspo": -tokens, "cispo": -logprob_sum, "dro": -logprob_sum}
        for loss_fn, loss in expected.items():
            output = client.forward(data, loss_fn).result()  # type: ignore[arg-type]
            assert output.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5), loss_fn
        ppo = client.forward_backward(data, "ppo", {"clip_low_threshold": 0.9}).result()
        assert ppo.metrics["ratio_mean:mean"] == pytest.approx(1.0)
        client.optim_step(ADAM).result()


def test_sampler_snapshots_are_suffixed_typed_and_listed(tp: TrainerPlatform) -> None:
    with _connect(tp, "snapshots-full") as service:
        client = service.create_training_client("tiny")
        first = client.save_weights_for_sampler_ext("step-0")
        second = client.save_weights_for_sampler_ext("step-1")
        third = client.save_weights_for_sampler_ext("step-2", checkpoint_type="BASE")
        wrapped = client.save_weights_for_sampler("step-3", checkpoint_type="base").result()
        client.save_state("state-1").result()
        with pytest.raises(ValueError, match="checkpoint_type"):
            client.save_weights_for_sampler_ext("step-4", checkpoint_type="full")
    assert re.fullmatch(r"step-0-[0-9a-f]{8}", first.snapshot_name)
    assert first.path == first.snapshot_name == qualify_snapshot_name(client.session_id, "step-0")
    assert logical_snapshot_name(second.snapshot_name) == "step-1"
    assert wrapped.path == qualify_snapshot_name(client.session_id, "step-3")
    types_by_name = {
        row["name"].rsplit("/", 1)[1]: (row["checkpointType"], row["promotable"])
        for row in tp.checkpoint_rows("snapshots-full")
    }
    assert types_by_name == {
        first.snapshot_name: ("CHECKPOINT_TYPE_INFERENCE_BASE", True),
        second.snapshot_name: ("CHECKPOINT_TYPE_INFERENCE_ARC_V2", False),  # full → delta
        third.snapshot_name: ("CHECKPOINT_TYPE_INFERENCE_BASE", True),
        wrapped.path: ("CHECKPOINT_TYPE_INFERENCE_BASE", True),
        "state-1": ("CHECKPOINT_TYPE_TRAINING", False),
    }

    with _connect(tp, "snapshots-lora", lora_rank=4) as service:
        client = service.create_training_client("tiny", lora_rank=4)
        adapter = client.save_weights_for_sampler_ext("step-0")
        again = client.save_weights_for_sampler_ext("step-1")  # LoRA: never a delta
        merged = client.save_weights_for_sampler_ext("step-2", checkpoint_type="merged_base")
        client.save_state("state-1").result()
    rows = [(r["checkpointType"], r["promotable"]) for r in tp.checkpoint_rows("snapshots-lora")]
    assert rows == [
        ("CHECKPOINT_TYPE_INFERENCE_LORA", True),
        ("CHECKPOINT_TYPE_INFERENCE_LORA", True),
        ("CHECKPOINT_TYPE_INFERENCE_BASE", True),
        ("CHECKPOINT_TYPE_TRAINING_LORA", False),
    ]
    assert {adapter.path, again.path, merged.path} == {
        qualify_snapshot_name(client.session_id, f"step-{i}") for i in range(3)
    }


def test_load_adapter_restores_an_exported_lora_adapter(tp: TrainerPlatform) -> None:
    with _connect(tp, "adapter", lora_rank=4) as service:
        trained = service.create_training_client("tiny", lora_rank=4, seed=1)
        _train(trained, 2)
        snapshot = trained.save_weights_for_sampler_ext("adapter")  # a PEFT adapter directory
        fresh = service.create_training_client("tiny", lora_rank=4, seed=2)
        assert not _all_equal(_logprobs(fresh), _logprobs(trained))
        adapter_dir = tp.platform.data_dir / "jobs" / "adapter" / "snapshots" / snapshot.path
        loaded = fresh.load_adapter(str(adapter_dir)).result()
        assert loaded.model_id == fresh.model_id
        assert _all_equal(_logprobs(fresh), _logprobs(trained))
        with pytest.raises(BadRequestError, match="absolute"):
            fresh.load_adapter("relative/adapter").result()


def test_reference_model_is_the_frozen_base(tp: TrainerPlatform) -> None:
    with _connect(tp, "reference") as service:
        policy = service.create_training_client("tiny")
        reference = service.create_base_training_client("tiny")
        before = _logprobs(policy)
        assert _all_equal(_logprobs(reference), before)
        _train(policy, 1)
        assert _all_equal(_logprobs(reference), before)
        with pytest.raises(BadRequestError, match="base_only") as failure:
            reference.forward_backward(BATCH, "cross_entropy").result()
        assert failure.value.status_code == 400 and failure.value.retryable is False


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_an_unloaded_reference_refuses_work_and_the_policy_trains_on(
    tp: TrainerPlatform, lora_rank: int
) -> None:
    with _connect(tp, f"unload-{lora_rank}", lora_rank=lora_rank) as service:
        policy = service.create_training_client("tiny", lora_rank=lora_rank, seed=1)
        reference = service.create_base_training_client("tiny")
        assert _all_equal(_logprobs(reference), _logprobs(policy))  # LoRA starts at the base
        unloaded = reference.unload_model().result(timeout=60)
        assert unloaded.model_id == reference.model_id
        with pytest.raises(BadRequestError, match="unloaded"):
            reference.forward(BATCH, "cross_entropy").result(timeout=60)
        losses = _train(policy, 2)
        assert losses[1] < losses[0]


def test_client_guards_and_clear_errors(
    tp: TrainerPlatform, caplog: pytest.LogCaptureFixture
) -> None:
    with _connect(tp, "guards") as service:
        with pytest.raises(BadRequestError, match="lora_rank") as refused:
            service.create_training_client("tiny", lora_rank=4)  # the job is full-parameter
        assert "lora_rank" in (refused.value.server_message or "")
        clone = pickle.loads(pickle.dumps(refused.value))
        assert (type(clone), str(clone)) == (BadRequestError, str(refused.value))
        with pytest.raises(BadRequestError, match="one base model"):
            service.create_training_client("smollm2-135m")
        client = service.create_training_client("tiny")  # the failed settings did not stick
        with pytest.raises(ValueError, match="already exists"):
            service.create_training_client("tiny")
        with pytest.raises(NotImplementedError):
            client.save_state("x", overwrite=True)
        with pytest.raises(NotImplementedError):
            client.save_weights_and_get_sampling_client()
        with pytest.raises(NotImplementedError):
            service.create_sampling_client(base_model="tiny")
        client.save_state("dup").result()
        with (
            caplog.at_level(logging.WARNING, logger="sdk.firetitan_training"),
            pytest.raises(BadRequestError, match="already exists"),
        ):
            client.save_state("dup").result()
        assert "already saved" in caplog.text


def test_fireworks_keys_skip_the_client_config_fetch(
    tp: TrainerPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fetch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("/api/v1/client/config must not be called for a Fireworks key")

    monkeypatch.setattr(
        internal_client_holder.InternalClientHolder, "_fetch_client_config", no_fetch
    )
    with _connect(tp, "no-config") as service:
        config = service.holder.get_client_config()
        assert config.use_pyqwest_transport is False
        assert config.proto_write_fwdbwd is False
    # The swap of tinker's key check is scoped to the constructor.
    assert internal_client_holder.__dict__["ApiKeyAuthProvider"] is ApiKeyAuthProvider
    with pytest.raises(tinker.TinkerError, match="tml-"):
        ApiKeyAuthProvider(api_key="fw-not-a-tinker-key")


def test_checkpoint_references() -> None:
    assert resolve_checkpoint_path("step-4") == "step-4"
    assert resolve_checkpoint_path("/abs/dir", "job-1") == "/abs/dir"
    assert resolve_checkpoint_path("gs://bucket/x", "job-1") == "gs://bucket/x"
    assert resolve_checkpoint_path(" step-4 ", " job-1 ") == "cross_job://job-1/step-4"
    assert resolve_checkpoint_path("step-4", "") == "step-4"
    with pytest.raises(ValueError, match="logical checkpoint name"):
        make_cross_job_ref("job-1", "a/b")
    assert logical_snapshot_name("step-4-0123abcd") == "step-4"
    assert logical_snapshot_name("step-4") == "step-4"


@pytest.mark.slow
def test_smollm2_creates_trains_one_step_and_saves(tp: TrainerPlatform) -> None:
    started = time.monotonic()
    url = tp.create_job("smollm2", lora_rank=8, base_model="smollm2-135m")
    with FiretitanServiceClient(url, tp.api_key) as service:
        client = service.create_training_client("fireloop/smollm2-135m", lora_rank=8)
        created = time.monotonic()
        losses = _train(client, 1)
        trained = time.monotonic()
        saved = client.save_state("step-1", timeout=600)
    logger.info(
        "smollm2-135m: create (with conversion) %.1f s, one LoRA step %.1f s, save %.1f s",
        created - started,
        trained - created,
        time.monotonic() - trained,
    )
    assert losses[0] > 0
    assert saved.result().path == "tinker://smollm2/weights/step-1"
    assert tp.checkpoint_rows("smollm2")[-1]["checkpointType"] == "CHECKPOINT_TYPE_TRAINING_LORA"


def test_model_creation_has_a_deadline(tp: TrainerPlatform) -> None:
    # A trainer that takes longer than the deadline to build the model: a typed wait timeout,
    # never a wait without end (the deadline here is far below the real build time).
    url = tp.create_job("model-deadline")
    with (
        FiretitanServiceClient(url, tp.api_key, model_timeout_s=0.001) as service,
        pytest.raises(WaitTimeoutError, match="create a model of 'tiny'"),
    ):
        service.create_training_client("tiny")
    with pytest.raises(ConfigError, match="model_timeout_s"):
        FiretitanServiceClient(url, tp.api_key, model_timeout_s=0)
