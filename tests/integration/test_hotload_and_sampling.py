"""Train → save → hotload → sample, end to end on a real `LocalPlatform` with the tiny model.

What a training loop relies on: after every verified hotload (the base load and two deltas, or
LoRA adapters) the deployment's logprobs for a fixed sequence equal the trainer's `forward` at
the same weights; a broken delta chain is refused and a reset heals it; sampling during a load
waits and then sees the new weights; 64 concurrent samples all complete; a deployment scaled to
zero comes back on demand; the wrong deployment is refused before anything is loaded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from tinker import types

from backend import LocalPlatform
from backend.serving import ServingSettings
from sdk import (
    DeploymentConfig,
    DeploymentError,
    DeploymentManager,
    DeploymentSampler,
    FiretitanServiceClient,
    FiretitanTrainingClient,
    FixedConcurrencyController,
    GradAccNormalization,
    NotFoundError,
    RetryPolicy,
    WeightSyncer,
)
from tests.trainer_support import BATCH, FAST_TIMINGS, TrainerPlatform, make_datum

ADAM = types.AdamParams(learning_rate=1e-2)
QUICK_RETRY = RetryPolicy(max_wait_s=30, base_delay_s=0.01, max_delay_s=0.05)
# A fixed sequence: "abc=cba" and EOS, as the reversal task writes it.
SEQUENCE = [*b"abc=", *b"cba", 258]
TOLERANCE = 1e-4
FAST_SERVING = ServingSettings(completed_hold_s=0.05, scale_up_timeout_s=60)
POLL_S = 0.02


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            platform.state.serving.settings = FAST_SERVING
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


@pytest.fixture
def manager(tp: TrainerPlatform) -> Iterator[DeploymentManager]:
    deployments = DeploymentManager(tp.api_key, tp.platform.base_url, retry=QUICK_RETRY)
    yield deployments
    deployments.close()


@dataclass
class Loop:
    """One trainer job with its training client, a deployment linked to it, and a syncer."""

    service: FiretitanServiceClient
    client: FiretitanTrainingClient
    syncer: WeightSyncer
    sampler: DeploymentSampler
    job_name: str
    deployment_id: str


def _deploy(manager: DeploymentManager, deployment_id: str, job_id: str | None) -> None:
    config = DeploymentConfig(
        deployment_id=deployment_id,
        base_model="tiny",
        hot_load_trainer_job=job_id,
        min_replica_count=1,
    )
    manager.create_or_get(config)
    manager.wait_for_ready(deployment_id, timeout_s=120, poll_interval_s=POLL_S)


def _syncer(
    client: FiretitanTrainingClient,
    manager: DeploymentManager,
    deployment_id: str,
    **kwargs: object,
) -> WeightSyncer:
    settings: dict[str, object] = {
        "base_model": "tiny",
        "hotload_timeout": 120,
        "hotload_poll_interval_s": POLL_S,
        "hotload_ready_timeout_s": 120,
        "verify_poll_interval_s": POLL_S,
        "warmup_retry_interval_s": POLL_S,
        **kwargs,
    }
    return WeightSyncer(client, manager, deployment_id, **settings)  # type: ignore[arg-type]


MakeLoop = Callable[..., Loop]


@pytest.fixture
def make_loop(tp: TrainerPlatform, manager: DeploymentManager) -> Iterator[MakeLoop]:
    services: list[FiretitanServiceClient] = []

    def make(name: str, lora_rank: int = 0) -> Loop:
        job_id, deployment_id = f"{name}-job", f"{name}-dep"
        service = FiretitanServiceClient(tp.create_job(job_id, lora_rank=lora_rank), tp.api_key)
        services.append(service)
        client = service.create_training_client("tiny", lora_rank=lora_rank, lora_alpha=16)
        _deploy(manager, deployment_id, job_id)
        job_name = f"accounts/{tp.platform.account_id}/rlorTrainerJobs/{job_id}"
        syncer = _syncer(client, manager, deployment_id, trainer_job_name=job_name)
        sampler = manager.create_sampler(deployment_id)
        return Loop(service, client, syncer, sampler, job_name, deployment_id)

    yield make
    for service in services:
        service.close()


def _train(client: FiretitanTrainingClient, steps: int = 2) -> None:
    for _ in range(steps):
        client.forward_backward(BATCH, "cross_entropy")
        client.optim_step(ADAM, GradAccNormalization.NUM_LOSS_TOKENS).result()


def _trainer_logprobs(client: FiretitanTrainingClient, tokens: list[int]) -> torch.Tensor:
    datum = make_datum(tokens[:-1], tokens[1:], [1.0] * (len(tokens) - 1))
    output = client.forward([datum], "cross_entropy").result()
    return torch.tensor(output.loss_fn_outputs[0]["logprobs"].data, dtype=torch.float64)


def _served_logprobs(
    sampler: DeploymentSampler,
) -> tuple[list[int], torch.Tensor, str | None]:
    """Echo the fixed sequence plus one sampled token: the whole sequence, the server's logprob
    of every token after the first (P + C - 1 entries), and the snapshot that produced them."""
    (sample,) = asyncio.run(sampler.sample_with_prompt_tokens(SEQUENCE, max_tokens=1, echo=True))
    assert sample.logprobs_echoed and sample.inference_logprobs is not None
    logprobs = torch.tensor(sample.inference_logprobs, dtype=torch.float64)
    return sample.full_tokens, logprobs, sample.snapshot_identity


def _compare(loop: Loop) -> tuple[float, torch.Tensor, str | None]:
    """The largest |served - trained| logprob gap, the served logprobs, and the snapshot
    identity the sample says it came from."""
    tokens, served, snapshot = _served_logprobs(loop.sampler)
    trained = _trainer_logprobs(loop.client, tokens)
    assert served.shape == trained.shape
    return float((served - trained).abs().max()), served[: len(SEQUENCE) - 1], snapshot


def _snapshot_meta(tp: TrainerPlatform, loop: Loop, identity: str) -> dict[str, object]:
    job_id = loop.job_name.rsplit("/", 1)[-1]
    path = tp.platform.data_dir / "jobs" / job_id / "snapshots" / identity / "snapshot.json"
    meta: dict[str, object] = json.loads(path.read_text())
    return meta


def _max_gap(loop: Loop) -> float:
    return _compare(loop)[0]


@pytest.mark.parametrize("lora_rank", [0, 8], ids=["full", "lora"])
def test_served_logprobs_equal_the_trainers_after_every_hotload(
    tp: TrainerPlatform, make_loop: MakeLoop, manager: DeploymentManager, lora_rank: int
) -> None:
    loop = make_loop(f"parity{lora_rank}", lora_rank)
    identities: list[str] = []
    gaps: list[float] = []
    served_logprobs: list[torch.Tensor] = []
    sampled_from: list[str | None] = []
    (base_sample,) = asyncio.run(loop.sampler.sample_with_prompt_tokens(SEQUENCE, max_tokens=1))
    for step in range(3):  # the base load, then two deltas (LoRA: three adapters)
        _train(loop.client)
        identities.append(loop.syncer.save_and_hotload(f"step-{step}"))
        gap, logprobs, snapshot = _compare(loop)
        gaps.append(gap)
        served_logprobs.append(logprobs)
        sampled_from.append(snapshot)
    assert max(gaps) <= TOLERANCE, gaps
    # Every sample names the snapshot it was generated with; the base weights name none.
    assert sampled_from == identities
    assert base_sample.snapshot_identity is None
    # The weights really moved between loads: parity is not the same numbers three times.
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in itertools.pairwise(served_logprobs))
    status = manager.hotload_check_status(loop.deployment_id, "tiny")
    assert status.replicas is not None
    served = status.replicas[0]
    kinds = [_snapshot_meta(tp, loop, identity)["checkpoint_type"] for identity in identities]
    if lora_rank:
        assert kinds == ["base"] * 3  # an adapter is always complete
        assert any(a.identity == identities[-1] for a in served.loaded_adapters)
    else:
        assert kinds == ["base", "delta", "delta"]
        assert served.current_snapshot_identity == identities[-1]
    assert loop.syncer.base_identity == identities[-1]


def test_a_delta_without_its_predecessor_is_refused_and_the_next_sync_heals(
    make_loop: MakeLoop, manager: DeploymentManager
) -> None:
    loop = make_loop("chain")
    first = loop.syncer.save_and_hotload("s1")
    _train(loop.client, 1)
    skipped = loop.syncer.save_only("s2")
    _train(loop.client, 1)
    last = loop.syncer.save_only("s3")
    assert skipped and last
    assert not loop.syncer.hotload(last, "delta")
    message = manager.last_hotload_error_message or ""
    assert skipped in message and first in message  # the refusal names both identities
    status = manager.hotload_check_status(loop.deployment_id, "tiny")
    assert status.replicas is not None
    assert status.replicas[0].current_snapshot_identity == first  # the old weights still serve
    # The failed hotload reset the syncer's chain: the next sync is a full load, which heals.
    healed = loop.syncer.sync("s4")
    assert healed.kind == "base" and loop.client.session_id in healed.identity
    assert _max_gap(loop) <= TOLERANCE


def test_sampling_during_a_hotload_waits_then_sees_the_new_weights(
    tp: TrainerPlatform, make_loop: MakeLoop
) -> None:
    loop = make_loop("during")
    before = loop.syncer.save_and_hotload("before")
    _train(loop.client, 3)
    tp.platform.state.serving.settings = FAST_SERVING.model_copy(update={"load_delay_s": 1.0})
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            loop.syncer.save_and_hotload("after")
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    syncing = threading.Thread(target=sync)
    try:
        syncing.start()
        _wait_for_stage(loop, ("downloading", "loading"))
        result, metrics = asyncio.run(
            loop.sampler.async_completions_stream(
                SEQUENCE, 1, echo=True, hotload_retry_interval=0.05, hotload_max_retries=200
            )
        )
    finally:
        syncing.join(timeout=120)
        tp.platform.state.serving.settings = FAST_SERVING
    assert not errors, errors
    assert metrics.attempts > 1  # answered 425 while loading, then served
    assert result.choices[0].raw_output is not None
    # It waited through the load, so the new snapshot generated it, and the answer says so.
    assert result.snapshot_identity == loop.syncer.base_identity != before
    assert _max_gap(loop) <= TOLERANCE  # and what serves now is the new weights


def _wait_for_stage(loop: Loop, stages: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = loop.syncer.deploy_mgr.hotload_check_status(  # type: ignore[union-attr]
            loop.deployment_id, "tiny"
        )
        if status.replicas and status.replicas[0].loading_state.stage in stages:
            return
        time.sleep(0.01)
    raise AssertionError(f"the hotload never reached {stages}")


def test_sixty_four_concurrent_samples_complete(make_loop: MakeLoop) -> None:
    loop = make_loop("fanout")
    loop.syncer.save_and_hotload("s1")

    async def fan_out() -> list[int]:
        results = await asyncio.gather(
            *(
                loop.sampler.sample_with_prompt_tokens(SEQUENCE[:4], max_tokens=8, seed=i)
                for i in range(64)
            )
        )
        return [len(samples) for samples in results]

    assert asyncio.run(fan_out()) == [1] * 64
    assert len(loop.sampler.drain_metrics()) == 64
    report = loop.sampler.concurrency_controller.step_completed()
    assert report["requests"] >= 64


def test_a_deployment_scaled_to_zero_serves_again_on_demand(
    make_loop: MakeLoop, manager: DeploymentManager
) -> None:
    loop = make_loop("zero")
    manager.scale_to_zero(loop.deployment_id)
    assert manager.hotload_check_status(loop.deployment_id, "tiny").replicas == []  # it is down
    (sample,) = asyncio.run(
        loop.sampler.sample_with_prompt_tokens(
            SEQUENCE[:4], max_tokens=4, hotload_retry_interval=0.05
        )
    )
    assert sample.completion_len >= 1


def test_the_tinker_shaped_sampling_client_samples_the_deployment(
    tp: TrainerPlatform, make_loop: MakeLoop
) -> None:
    loop = make_loop("tinker")
    loop.syncer.save_and_hotload("s1")
    sampler = DeploymentSampler(
        loop.sampler.inference_url,
        loop.sampler.model,
        tp.api_key,
        concurrency_controller=FixedConcurrencyController(4),
    )
    with loop.service.create_sampling_client(deployment_sampler=sampler) as client:
        params = types.SamplingParams(max_tokens=4, seed=3, temperature=1.0)
        response = client.sample(types.ModelInput.from_ints(SEQUENCE[:4]), 2, params).result(60)
    assert len(response.sequences) == 2
    assert all(len(s.tokens) == len(s.logprobs or []) for s in response.sequences)


def test_the_wrong_deployment_is_refused_before_any_load(
    tp: TrainerPlatform, make_loop: MakeLoop, manager: DeploymentManager
) -> None:
    loop = make_loop("mine")
    tp.create_job("theirs-job")
    _deploy(manager, "theirs-dep", "theirs-job")
    before = manager.hotload_check_status("theirs-dep", "tiny")

    # Linked to another trainer: the syncer refuses it from the deployment's own record...
    linked = _syncer(loop.client, manager, "theirs-dep", trainer_job_name=loop.job_name)
    with pytest.raises(DeploymentError, match="theirs-job"):
        linked.save_and_hotload("a")
    # ...and without that check, the platform refuses the snapshot (not among its trainer's).
    unchecked = _syncer(loop.client, manager, "theirs-dep")
    with pytest.raises(NotFoundError, match="mine-job"):
        unchecked.save_and_hotload("b")
    # On another base model: refused before any request to load.
    other_base = _syncer(loop.client, manager, loop.deployment_id, base_model="smollm2-135m")
    with pytest.raises(DeploymentError, match="base model"):
        other_base.save_and_hotload("c")

    after = manager.hotload_check_status("theirs-dep", "tiny")
    assert before.replicas and after.replicas
    assert (
        after.replicas[0].current_snapshot_identity == before.replicas[0].current_snapshot_identity
    )
    mine = manager.hotload_check_status(loop.deployment_id, "tiny")
    assert mine.replicas and not mine.replicas[0].current_snapshot_identity
