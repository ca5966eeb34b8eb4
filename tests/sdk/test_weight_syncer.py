"""`WeightSyncer` against a fake deployment and training client: the syncer's own base/delta
decision and its typed result (first base, then deltas with the exact metadata; LoRA always
base; reset → base; a failed hotload → base), identity verification on every replica, the wait
for replicas before the first load, the deployment checks made before any load, and the
never-raising variants."""

from __future__ import annotations

import json
import logging

import pytest

from sdk import (
    ConfigError,
    DeploymentError,
    DeploymentManager,
    HotloadError,
    StaleDeploymentError,
    WeightSyncer,
)
from sdk.weight_syncer import SyncResult
from tests.sdk.conftest import FAST_RETRY
from tests.sdk.fakes import API_KEY, BASE_URL, FakeClock
from tests.sdk.serving_fakes import (
    BASE_MODEL,
    DEP,
    DEP_NAME,
    TRAINER_JOB,
    FakePolicyClient,
    FakeServing,
)


@pytest.fixture
def serving() -> FakeServing:
    serving = FakeServing()
    deployment = serving.control.add_deployment(DEP, "READY")
    deployment.wire.update({"baseModel": BASE_MODEL, "hotLoadTrainerJob": TRAINER_JOB})
    serving.control.completions_status = 200  # warmup probes answer
    return serving


@pytest.fixture
def manager(serving: FakeServing, clock: FakeClock) -> DeploymentManager:
    return DeploymentManager(
        API_KEY,
        BASE_URL,
        transport=serving.transport(),
        retry=FAST_RETRY,
        sleep=clock.sleep,
        clock=clock,
    )


def make_syncer(
    manager: DeploymentManager, policy: FakePolicyClient, **kwargs: object
) -> WeightSyncer:
    settings: dict[str, object] = {
        "base_model": BASE_MODEL,
        "hotload_timeout": 60,
        "hotload_poll_interval_s": 1,
        "hotload_ready_timeout_s": 30,
        "verify_timeout_s": 10,
        "warmup_retry_interval_s": 1,
        **kwargs,
    }
    return WeightSyncer(policy, manager, DEP, **settings)  # type: ignore[arg-type]


@pytest.fixture
def policy(serving: FakeServing) -> FakePolicyClient:
    return FakePolicyClient(serving)


@pytest.fixture
def syncer(manager: DeploymentManager, policy: FakePolicyClient) -> WeightSyncer:
    return make_syncer(manager, policy)


def metadata_sent(serving: FakeServing) -> list[dict[str, str] | None]:
    return [body.get("incremental_snapshot_metadata") for body in serving.sent_bodies()]


def delta_after(identity: str) -> dict[str, str]:
    return {
        "previous_snapshot_identity": identity,
        "compression_format": "arc_v2",
        "checksum_format": "alder32",
    }


def kinds(results: list[SyncResult]) -> list[str]:
    return [result.kind for result in results]


# -- the syncer's decision: base or delta ------------------------------------------------------


def test_sync_decides_base_then_delta_and_returns_what_it_did(
    syncer: WeightSyncer, serving: FakeServing, policy: FakePolicyClient
) -> None:
    results = [syncer.sync(f"step-{i}") for i in (1, 2, 3)]
    assert kinds(results) == ["base", "delta", "delta"]
    assert [kind for _, kind in policy.saves] == kinds(results)  # what the trainer was asked
    first = results[0]
    assert (first.name, first.identity, first.deployment_id) == ("step-1", "step-1-c0ffee00", DEP)
    assert first.hotloaded
    assert metadata_sent(serving)[1:] == [delta_after(r.identity) for r in results[:2]]
    assert syncer.last_synced == results[-1]
    assert serving.replicas[0].identity == results[-1].identity
    timing = results[-1].timing
    assert timing.hotload_s > 0 and timing.verify_s >= 0  # fake seconds slept while polling
    assert timing.total_s >= timing.save_s + timing.hotload_s + timing.verify_s + timing.warmup_s
    assert syncer.last_timing["hotload_time_s"] == timing.hotload_s + timing.verify_s


def test_sync_on_lora_is_always_base(manager: DeploymentManager, serving: FakeServing) -> None:
    serving.lora = True
    syncer = make_syncer(manager, FakePolicyClient(serving, lora_rank=8))
    assert kinds([syncer.sync(f"step-{i}") for i in range(3)]) == ["base"] * 3
    assert metadata_sent(serving) == [None, None, None]


def test_sync_after_a_reset_is_base_and_nothing_is_vouched_for(syncer: WeightSyncer) -> None:
    before = [syncer.sync("a"), syncer.sync("b")]
    syncer.reset_delta_chain()
    assert syncer.last_synced is None
    assert kinds([*before, syncer.sync("c"), syncer.sync("d")]) == [
        "base",
        "delta",
        "base",
        "delta",
    ]


def test_sync_after_a_hotload_error_is_base_without_a_reset(
    syncer: WeightSyncer, serving: FakeServing
) -> None:
    first = syncer.sync("s1")
    syncer.save_only("s2")  # the trainer's next delta is taken against s2, never served
    with pytest.raises(HotloadError) as caught:
        syncer.sync("s3")
    assert "s2-c0ffee00" in str(caught.value) and first.identity in str(caught.value)
    assert syncer.last_synced is None  # the deployment's state is not vouched for
    healed = syncer.sync("s4")  # no reset_delta_chain() call: the syncer reset itself
    assert (healed.kind, metadata_sent(serving)[-1]) == ("base", None)
    assert serving.replicas[0].identity == healed.identity
    assert syncer.sync("s5").kind == "delta"


def test_sync_after_a_failed_save_is_base(syncer: WeightSyncer, policy: FakePolicyClient) -> None:
    syncer.sync("a")
    policy.fail_next_save = True
    with pytest.raises(RuntimeError, match="trainer unavailable"):
        syncer.sync("b")
    assert syncer.sync("c").kind == "base"


def test_sync_without_a_deployment_saves_only(serving: FakeServing) -> None:
    result = WeightSyncer(FakePolicyClient(serving)).sync("a")
    assert (result.identity, result.kind, result.deployment_id) == ("a-c0ffee00", "base", None)
    assert not result.hotloaded and result.timing.hotload_s == 0.0


# -- the delta chain on the wire ---------------------------------------------------------------


def test_first_sync_is_base_then_deltas_with_the_exact_metadata(
    syncer: WeightSyncer, serving: FakeServing, policy: FakePolicyClient
) -> None:
    names = [syncer.save_and_hotload(f"step-{i}") for i in (1, 2, 3)]
    assert names == ["step-1-c0ffee00", "step-2-c0ffee00", "step-3-c0ffee00"]
    assert [kind for _, kind in policy.saves] == ["base", "delta", "delta"]
    assert metadata_sent(serving) == [None, delta_after(names[0]), delta_after(names[1])]
    assert serving.replicas[0].identity == names[2]
    assert syncer.base_identity == names[2]
    assert all(body["reset_prompt_cache"] is True for body in serving.sent_bodies())


def test_lora_is_always_base_and_never_sends_metadata(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.lora = True
    syncer = make_syncer(manager, FakePolicyClient(serving, lora_rank=8))
    assert syncer.lora_rank == 8  # taken from the training client
    for step in range(3):
        syncer.save_and_hotload(f"step-{step}")
    assert [kind for _, kind in syncer.policy_client.saves] == ["base"] * 3  # type: ignore[attr-defined]
    assert metadata_sent(serving) == [None, None, None]


def test_an_explicit_delta_on_lora_still_sends_no_metadata(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.lora = True
    syncer = make_syncer(manager, FakePolicyClient(serving, lora_rank=8))
    syncer.save_and_hotload("a")
    assert syncer.hotload("a-c0ffee00", "base")
    assert metadata_sent(serving) == [None, None]


def test_reset_delta_chain_makes_the_next_sync_base(
    syncer: WeightSyncer, serving: FakeServing, policy: FakePolicyClient
) -> None:
    syncer.save_and_hotload("a")
    syncer.save_and_hotload("b")
    syncer.reset_delta_chain()
    assert (syncer.base_saved, syncer.base_identity) == (False, None)
    syncer.save_and_hotload("c")
    assert [kind for _, kind in policy.saves] == ["base", "delta", "base"]
    assert metadata_sent(serving)[2] is None


def test_save_only_twice_then_hotload_sends_the_chain_the_server_refuses(
    syncer: WeightSyncer, serving: FakeServing, caplog: pytest.LogCaptureFixture
) -> None:
    first = syncer.save_and_hotload("s1")
    assert syncer.save_only("s2") == "s2-c0ffee00"
    last = syncer.save_only("s3")
    assert last == "s3-c0ffee00"
    with caplog.at_level(logging.ERROR, logger="sdk.weight_syncer"):
        assert not syncer.hotload(last, "delta")
    # The chain follows the last *hotloaded* identity, not the last saved one.
    assert metadata_sent(serving)[-1] == delta_after(first)
    assert "s2-c0ffee00" in caplog.text and first in caplog.text  # the refusal names both
    assert syncer.base_identity is None  # the failure reset the chain
    assert syncer.save_and_hotload("s4") == "s4-c0ffee00"  # a base load heals the chain
    assert metadata_sent(serving)[-1] is None
    assert serving.replicas[0].identity == "s4-c0ffee00"


def test_a_second_run_on_the_same_deployment_starts_with_a_full_load(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.serve("old-run-snapshot")
    syncer = make_syncer(manager, FakePolicyClient(serving, session_id="0badcafe"))
    syncer.base_identity = "old-run-snapshot"  # whatever it believed, the deployment wins
    syncer.save_and_hotload("step-1")
    assert metadata_sent(serving) == [None]
    assert serving.replicas[0].identity == "step-1-0badcafe"


# -- verification of every replica, and hotload readiness -------------------------------------


def test_a_lagging_replica_is_waited_for(
    syncer: WeightSyncer, serving: FakeServing, clock: FakeClock
) -> None:
    serving.add_replica(lag=4)
    syncer.save_and_hotload("a")
    assert [r.identity for r in serving.replicas] == ["a-c0ffee00"] * 2


def test_a_replica_that_stays_stale_raises_naming_both_identities(
    syncer: WeightSyncer, serving: FakeServing
) -> None:
    serving.add_replica()
    serving.serve("old")
    serving.replicas[1].stuck = True
    with pytest.raises(StaleDeploymentError) as caught:
        syncer.save_and_hotload("a")
    error = caught.value
    assert (error.expected_identity, error.served_identity) == ("a-c0ffee00", "old")
    assert "'old'" in str(error) and "'a-c0ffee00'" in str(error)
    assert syncer.base_identity is None  # not verified: not a base for deltas
    assert serving.control.sent("POST", "/completions") == []  # nothing sampled (no warmup)


def test_the_first_load_waits_until_the_status_lists_replicas(
    syncer: WeightSyncer, serving: FakeServing
) -> None:
    seen: list[str] = []
    serving.on_request = lambda request: seen.append(f"{request.method} {request.url.path}")
    serving.hidden_polls = 3
    syncer.save_and_hotload("a")
    hotload = seen.index("POST /hot_load/v1/models/hot_load")
    # Three empty replica lists, then one listing replicas (a load sent earlier can crash a
    # serving container), then the read of what the deployment already serves.
    assert seen[:hotload].count("GET /hot_load/v1/models/hot_load") == 5


def test_the_deployment_check_runs_once_per_chain(
    syncer: WeightSyncer, serving: FakeServing
) -> None:
    syncer.save_and_hotload("a")
    syncer.save_and_hotload("b")
    assert len(serving.control.sent("GET", f"/deployments/{DEP}")) == 1
    syncer.reset_delta_chain()
    syncer.save_and_hotload("c")
    assert len(serving.control.sent("GET", f"/deployments/{DEP}")) == 2


# -- the wrong deployment is refused before any load -------------------------------------------


def test_a_deployment_on_another_base_model_is_refused(
    syncer: WeightSyncer, serving: FakeServing
) -> None:
    serving.control.deployments[DEP].wire["baseModel"] = "accounts/fireworks/models/llama-8b"
    with pytest.raises(DeploymentError, match="llama-8b"):
        syncer.save_and_hotload("a")
    assert serving.hotload_posts == []


def test_a_deployment_attached_to_another_trainer_is_refused(
    manager: DeploymentManager, serving: FakeServing, policy: FakePolicyClient
) -> None:
    other = "accounts/acct/rlorTrainerJobs/other"
    syncer = make_syncer(manager, policy, trainer_job_name=other)
    with pytest.raises(DeploymentError, match="reattach_trainer") as caught:
        syncer.save_and_hotload("a")
    assert TRAINER_JOB in str(caught.value) and other in str(caught.value)
    assert serving.hotload_posts == []


# -- the contracts of the variants ------------------------------------------------------------


def test_save_only_and_hotload_report_instead_of_raising(
    syncer: WeightSyncer, policy: FakePolicyClient, serving: FakeServing
) -> None:
    policy.fail_next_save = True
    assert syncer.save_only("a") is None
    assert not syncer.hotload("never-saved", "base")  # 404 from the bucket: False
    policy.fail_next_save = True
    with pytest.raises(RuntimeError, match="trainer unavailable"):
        syncer.save_and_hotload("b")


def test_without_a_deployment_saves_only(serving: FakeServing) -> None:
    policy = FakePolicyClient(serving)
    syncer = WeightSyncer(policy)
    assert not syncer.hotload_enabled
    assert syncer.save_and_hotload("a") == "a-c0ffee00"
    assert serving.hotload_posts == []
    with pytest.raises(ConfigError, match="deploy_mgr and deployment_id"):
        syncer.check_deployment_state()


def test_warmup_follows_a_verified_hotload_and_timing_is_recorded(
    syncer: WeightSyncer, serving: FakeServing
) -> None:
    syncer.save_and_hotload("a")
    (probe,) = serving.control.sent("POST", "/completions")
    assert json.loads(probe.content)["model"] == DEP_NAME
    assert set(syncer.last_timing) == {
        "save_time_s",
        "hotload_time_s",
        "warmup_time_s",
        "total_time_s",
    }
    assert syncer.last_timing["hotload_time_s"] > 0  # fake seconds slept while polling


def test_a_failed_warmup_is_not_fatal(
    manager: DeploymentManager, serving: FakeServing, policy: FakePolicyClient
) -> None:
    serving.control.completions_status = 503
    syncer = make_syncer(manager, policy, warmup_max_retries=2)
    assert syncer.save_and_hotload("a") == "a-c0ffee00"
    assert len(serving.control.sent("POST", "/completions")) == 2


def test_reset_prompt_cache_false_is_passed_through(
    manager: DeploymentManager, serving: FakeServing, policy: FakePolicyClient
) -> None:
    make_syncer(manager, policy, reset_prompt_cache=False).save_and_hotload("a")
    assert serving.sent_bodies()[0]["reset_prompt_cache"] is False


def test_state_helpers(syncer: WeightSyncer, serving: FakeServing) -> None:
    assert syncer.check_deployment_state() is None
    syncer.save_and_hotload("a")
    assert syncer.check_deployment_state() == "a-c0ffee00"
    sampler = syncer.get_deployment_sampler()
    assert (sampler.model, sampler.inference_url) == (DEP_NAME, BASE_URL)


def test_configuration_errors(manager: DeploymentManager, serving: FakeServing) -> None:
    with pytest.raises(ConfigError, match="base_model"):
        WeightSyncer(FakePolicyClient(serving), manager, DEP)
    with pytest.raises(ConfigError, match="lora_rank"):
        make_syncer(manager, FakePolicyClient(serving, lora_rank=8), lora_rank=16)
    with pytest.raises(ConfigError, match="checkpoint_type"):
        make_syncer(manager, FakePolicyClient(serving), first_checkpoint_type="full")


def test_a_sync_with_the_default_settings_pauses_briefly_while_the_load_runs(
    manager: DeploymentManager, policy: FakePolicyClient, serving: FakeServing, clock: FakeClock
) -> None:
    # As a user builds it: the published 5 s hotload poll interval, the 1 s verify interval.
    syncer = WeightSyncer(policy, manager, DEP, base_model=BASE_MODEL)
    serving.add_replica(lag=4)
    started = clock()
    result = syncer.sync("a")
    assert result.identity == "a-c0ffee00"
    # Replica 0 serves after one pause, the lagging replica a few reads later: a few short
    # pauses, not one of the whole 5 s interval.
    assert clock.sleeps == [0.05, 0.05, 0.1, 0.2]
    assert clock() - started == pytest.approx(0.4)
