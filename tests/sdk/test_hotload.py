"""`DeploymentManager`'s hotload surface against a fake deployment: the load request and its
headers, the `reset_prompt_cache` drop-and-remember rule, the wire-compatible wait (replica 0,
stale errors, pending replicas, timeouts), fireloop's all-replica verification, warmup and
re-attaching a deployment to another trainer."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from sdk import (
    BadRequestError,
    DeploymentError,
    DeploymentManager,
    HotloadError,
    IncrementalSnapshotMetadata,
    StaleDeploymentError,
    WaitTimeoutError,
)
from tests.sdk.conftest import FAST_RETRY
from tests.sdk.fakes import ACCOUNT, API_KEY, BASE_URL, FakeClock, rpc_error
from tests.sdk.serving_fakes import (
    BASE_MODEL,
    DEP,
    DEP_NAME,
    STRICT_SCHEMA_MESSAGE,
    TRAINER_JOB,
    FakeServing,
)

DELTA = IncrementalSnapshotMetadata(previous_snapshot_identity="s1")


@pytest.fixture
def serving() -> FakeServing:
    serving = FakeServing()
    serving.add_snapshot("s1")
    serving.add_snapshot("s2", "delta", base="s1")
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


def _wait(manager: DeploymentManager, identity: str = "s1", timeout: float = 60) -> bool:
    return manager.wait_for_hotload(DEP, BASE_MODEL, identity, timeout_seconds=timeout)


# -- the load request -------------------------------------------------------------------------


def test_hotload_sends_the_headers_and_body_of_the_spec(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    ack = manager.hotload(DEP, BASE_MODEL, "s1", path="gs://bucket/s1")
    assert (ack.identity, ack.accepted) == ("s1", True)
    (post,) = serving.hotload_posts
    assert post.url == f"{BASE_URL}/hot_load/v1/models/hot_load"
    assert post.headers["fireworks-model"] == BASE_MODEL
    assert post.headers["fireworks-deployment"] == f"accounts/{ACCOUNT}/deployments/{DEP}"
    assert post.headers["authorization"] == f"Bearer {API_KEY}"
    assert post.headers["x-api-key"] == API_KEY
    assert post.headers["x-fireworks-hot-load-source-url"] == "gs://bucket/s1"
    assert json.loads(post.content) == {"identity": "s1", "reset_prompt_cache": True}


def test_delta_metadata_is_sent_with_the_exact_literals(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    manager.hotload(DEP, BASE_MODEL, "s2", DELTA, reset_prompt_cache=False)
    assert serving.sent_bodies() == [
        {
            "identity": "s2",
            "reset_prompt_cache": False,
            "incremental_snapshot_metadata": {
                "previous_snapshot_identity": "s1",
                "compression_format": "arc_v2",
                "checksum_format": "alder32",
            },
        }
    ]


def test_a_plain_dict_of_metadata_is_accepted_as_the_reference_sdk_sends_it(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    metadata = {"previous_snapshot_identity": "s1", "compression_format": "arc_v2"}
    manager.hotload(DEP, BASE_MODEL, "s2", metadata)
    assert serving.sent_bodies()[0]["incremental_snapshot_metadata"] == metadata


def test_status_reads_carry_no_source_url(manager: DeploymentManager, serving: FakeServing) -> None:
    status = manager.hotload_check_status(DEP, BASE_MODEL)
    assert status.replicas is not None and status.replicas[0].readiness
    (get,) = serving.status_gets
    assert "x-fireworks-hot-load-source-url" not in get.headers
    assert get.headers["fireworks-deployment"] == DEP_NAME


def test_reset_prompt_cache_is_dropped_once_refused_and_never_sent_again(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.strict_schema = True
    manager.hotload(DEP, BASE_MODEL, "s1")
    manager.hotload(DEP, BASE_MODEL, "s1")
    assert serving.sent_bodies() == [
        {"identity": "s1", "reset_prompt_cache": True},  # refused with 400
        {"identity": "s1"},  # resent at once without the field
        {"identity": "s1"},  # remembered: never sent again
    ]


def test_another_400_is_raised_without_a_resend(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.canned_posts.append(rpc_error(400, "identity: must not be empty"))
    with pytest.raises(BadRequestError, match="must not be empty"):
        manager.hotload(DEP, BASE_MODEL, "s1")
    assert len(serving.hotload_posts) == 1


def test_the_strict_schema_message_is_recognised_case_insensitively() -> None:
    from sdk.hotload import _refuses_reset_field

    assert _refuses_reset_field(STRICT_SCHEMA_MESSAGE)
    assert not _refuses_reset_field("identity: Extra inputs are not permitted")


# -- wait_for_hotload (replica 0 only, like the published SDK) ---------------------------------


def test_wait_succeeds_once_replica_zero_is_ready_with_the_identity(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.load_ticks = 3
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1", poll_interval=5)
    assert len(serving.status_gets) == 3  # downloading, loading, then served
    # The pauses start at 50 ms: a load that takes a fraction of a second costs no more.
    assert clock.sleeps == [0.05, 0.1]
    assert manager.last_hotload_error_message is None


def test_the_waits_ask_for_a_held_status_within_their_deadline_and_a_plain_read_does_not(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.load_ticks = 2
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1", timeout_seconds=1.5)
    held = [dict(request.url.params) for request in serving.status_gets]
    # The hold asked for is what is left of the deadline (1.5 s, then 1.45 s after a pause).
    assert held == [
        {"wait_for_identity": "s1", "max_wait_s": "1.500"},
        {"wait_for_identity": "s1", "max_wait_s": "1.450"},
    ]
    serving.status_gets.clear()
    manager.verify_hotload(DEP, BASE_MODEL, "s1", timeout_s=30, poll_interval_s=1)
    (verified,) = serving.status_gets
    assert dict(verified.url.params) == {"wait_for_identity": "s1", "max_wait_s": "2.000"}
    # The published SDK's status read sends no such parameter, and neither does ours.
    serving.status_gets.clear()
    manager.hotload_check_status(DEP, BASE_MODEL)
    assert [dict(r.url.params) for r in serving.status_gets] == [{}]


def test_a_server_refusing_the_held_status_parameters_is_polled_plainly_from_then_on(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.load_ticks = 3
    serving.canned_status.append(rpc_error(422, "wait_for_identity: extra query parameter"))
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1", poll_interval=1)
    sent = [set(request.url.params) for request in serving.status_gets]
    assert sent == [{"wait_for_identity", "max_wait_s"}, set(), set(), set()]


def test_wait_with_the_default_interval_backs_off_to_it_and_keeps_the_deadline(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.serve("s0")
    serving.replicas[0].stuck = True
    manager.hotload(DEP, BASE_MODEL, "s1")
    assert not manager.wait_for_hotload(DEP, BASE_MODEL, "s1", timeout_seconds=12)
    doubling = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    # Doubling up to the published default (5 s), which caps the pauses; the last one is cut
    # short by the deadline, where the final look happens.
    assert clock.sleeps == pytest.approx([*doubling, 5, 12 - sum(doubling) - 5])
    assert len(serving.status_gets) == len(clock.sleeps) + 1
    assert sum(clock.sleeps) == pytest.approx(12)


def test_a_poll_interval_below_the_first_pause_is_used_from_the_start(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.load_ticks = 4
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1", poll_interval=0.02)
    assert clock.sleeps == [0.02, 0.02, 0.02]


def test_a_status_without_a_replicas_list_is_a_schema_error(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.omit_replicas_key = True
    with pytest.raises(DeploymentError, match="no `replicas` list"):
        _wait(manager)


def test_an_empty_replica_list_is_pending(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.serve("s1")
    serving.hidden_polls = 2
    assert _wait(manager)
    assert len(clock.sleeps) == 2


def test_a_loaded_adapter_with_the_identity_counts(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.lora = True
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1")
    assert serving.replicas[0].identity == ""  # the base weights stay; the adapter is loaded


def test_an_error_for_the_expected_identity_fails_with_its_message(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.serve("s0")  # s2 is a delta against s1, but s0 is served
    assert not manager.hotload_and_wait(DEP, BASE_MODEL, "s2", DELTA)
    message = manager.last_hotload_error_message or ""
    assert "'s1'" in message and "'s0'" in message


def test_a_stale_error_for_another_target_is_ignored(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    manager.hotload(DEP, BASE_MODEL, "s1")
    stale = {
        "current_snapshot_identity": "s0",
        "readiness": True,
        "loading_state": {"stage": "error", "target_snapshot_identity": "s0", "error": "old"},
    }
    serving.canned_status.append(httpx.Response(200, json={"replicas": [stale]}))
    assert _wait(manager)
    assert len(serving.status_gets) == 3  # the stale error, then two ticks of the real load
    assert manager.last_hotload_error_message is None


def test_transient_status_failures_are_logged_and_outlived(
    manager: DeploymentManager,
    serving: FakeServing,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager.hotload(DEP, BASE_MODEL, "s1")
    serving.canned_status.extend([rpc_error(503, "busy", 14), httpx.ConnectError("reset")])
    with caplog.at_level(logging.WARNING, logger="sdk.hotload"):
        assert _wait(manager)
    assert "polling on" in caplog.text
    assert len(clock.sleeps) == 3  # no retry budget spent inside the polls


def test_timeout_returns_false_with_a_diagnostic(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.serve("s0")
    serving.replicas[0].stuck = True
    manager.hotload(DEP, BASE_MODEL, "s1")
    assert not _wait(manager, timeout=12)
    message = manager.last_hotload_error_message or ""
    assert "'s1'" in message and "'s0'" in message and "'downloading'" in message
    assert sum(clock.sleeps) == pytest.approx(12)


def test_only_replica_zero_is_examined_by_the_wire_compatible_wait(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.add_replica(lag=10)
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1")
    # Replica 1 is still loading: the published wait looks at replica 0 only.
    assert serving.replicas[1].identity == ""


# -- verify_hotload: every replica ---------------------------------------------------------


def test_verification_waits_for_a_lagging_replica(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.add_replica(lag=3)
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1", poll_interval=1)
    status = manager.verify_hotload(DEP, BASE_MODEL, "s1", timeout_s=30, poll_interval_s=1)
    assert status.replicas is not None
    assert [r.current_snapshot_identity for r in status.replicas] == ["s1", "s1"]
    assert clock.sleeps == [0.05, 0.05, 0.1]  # each wait backs off from 50 ms again


def test_verification_pauses_are_capped_by_its_interval_and_deadline(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.add_replica()
    serving.serve("s0")
    serving.replicas[1].stuck = True
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1")
    clock.sleeps.clear()
    with pytest.raises(StaleDeploymentError):
        manager.verify_hotload(DEP, BASE_MODEL, "s1", timeout_s=3, poll_interval_s=1)
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1, 3 - 2.55])


def test_a_replica_that_never_catches_up_is_a_stale_deployment(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.add_replica()
    serving.serve("s0")
    serving.replicas[1].stuck = True
    assert manager.hotload_and_wait(DEP, BASE_MODEL, "s1")
    with pytest.raises(StaleDeploymentError) as caught:
        manager.verify_hotload(DEP, BASE_MODEL, "s1", timeout_s=5, poll_interval_s=1)
    error = caught.value
    assert (error.expected_identity, error.served_identity, error.replica_index) == ("s1", "s0", 1)
    assert "'s0'" in str(error) and "'s1'" in str(error)


def test_a_replica_that_failed_on_the_identity_fails_verification_at_once(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.add_replica()
    manager.hotload_and_wait(DEP, BASE_MODEL, "s1")
    second = serving.replicas[1]
    second.stage, second.target, second.error_message = "error", "s1", "disk full"
    with pytest.raises(HotloadError, match="disk full"):
        manager.verify_hotload(DEP, BASE_MODEL, "s1", timeout_s=30)
    assert clock.sleeps.count(1) == 0


def test_wait_for_hotload_ready_waits_for_replicas(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.hidden_polls = 3
    manager.wait_for_hotload_ready(DEP, BASE_MODEL, timeout_s=60, poll_interval_s=2)
    assert clock.sleeps == [0.05, 0.1, 0.2]
    serving.hidden_polls = 100
    with pytest.raises(WaitTimeoutError, match="list replicas"):
        manager.wait_for_hotload_ready(DEP, BASE_MODEL, timeout_s=4, poll_interval_s=2)


# -- warmup ---------------------------------------------------------------------------------


def test_warmup_retries_until_a_completion_answers(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.control.queue("POST /inference/v1/completions", rpc_error(503, "cold", 14))
    serving.control.completions_status = 200
    assert manager.warmup(DEP_NAME, max_retries=3, retry_interval_s=0.5)
    assert clock.sleeps == [0.5]
    probe = json.loads(serving.control.sent("POST", "/completions")[-1].content)
    assert probe == {"model": DEP_NAME, "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0}


def test_warmup_gives_up_quietly(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock
) -> None:
    serving.control.queue("POST /inference/v1/completions", *[httpx.ConnectError("refused")] * 2)
    serving.control.completions_status = 503
    assert not manager.warmup(DEP_NAME, max_retries=4, retry_interval_s=1)
    assert clock.sleeps == [1, 1, 1]


# -- reattach_trainer (no PATCH when already attached) --------------------------------------


def test_reattach_to_the_same_trainer_sends_no_patch(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.control.add_deployment(DEP, "READY").wire["hotLoadTrainerJob"] = TRAINER_JOB
    info = manager.reattach_trainer(
        DEP, base_model=BASE_MODEL, trainer_job_name=TRAINER_JOB, timeout_s=60
    )
    assert info.hot_load_trainer_job == TRAINER_JOB
    assert serving.control.sent("PATCH") == []


@pytest.mark.parametrize("served", ["old-snapshot", ""], ids=["snapshot", "base-weights"])
def test_reattach_patches_and_waits_for_the_pod_to_roll(
    manager: DeploymentManager, serving: FakeServing, clock: FakeClock, served: str
) -> None:
    deployment = serving.control.add_deployment(DEP, "READY", "UPDATING", "UPDATING", "READY")
    deployment.wire["hotLoadTrainerJob"] = "accounts/acct/rlorTrainerJobs/old"
    serving.replicas[0].identity = served

    def restart_pod(request: httpx.Request) -> None:
        if request.method == "PATCH":
            serving.replicas[0].restart()

    serving.on_request = restart_pod
    info = manager.reattach_trainer(
        DEP, base_model=BASE_MODEL, trainer_job_name=TRAINER_JOB, timeout_s=60, poll_interval_s=3
    )
    assert info.hot_load_trainer_job == TRAINER_JOB
    (patch,) = serving.control.sent("PATCH")
    assert patch.url.params["updateMask"] == "hot_load_trainer_job"
    assert json.loads(patch.content) == {"hotLoadTrainerJob": TRAINER_JOB}
    # UPDATING, UPDATING, then READY with a new identity (snapshot gone, or a new pod name).
    assert clock.sleeps == [3, 3]


def test_reattach_times_out_when_the_old_snapshot_stays(
    manager: DeploymentManager, serving: FakeServing
) -> None:
    serving.control.add_deployment(DEP, "READY")
    serving.serve("old-snapshot")
    with pytest.raises(WaitTimeoutError, match="restart attached"):
        manager.reattach_trainer(
            DEP, base_model=BASE_MODEL, trainer_job_name=TRAINER_JOB, timeout_s=6, poll_interval_s=3
        )


def test_reattach_of_a_missing_deployment_is_an_error(manager: DeploymentManager) -> None:
    with pytest.raises(DeploymentError, match="does not exist"):
        manager.reattach_trainer(
            DEP, base_model=BASE_MODEL, trainer_job_name=TRAINER_JOB, timeout_s=6
        )
