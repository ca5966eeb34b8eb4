"""Hotload on the tiny model: snapshots saved by a real trainer through the Firetitan
client, loaded over raw HTTP, verified by comparing served logprobs with the trainer's `forward`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from backend.trainer.atomic import write_marker
from backend.trainer.export import load_full_tensors
from tests.backend.serving.conftest import (
    DEPLOYMENTS,
    HOTLOAD,
    SEQUENCE,
    TOLERANCE,
    ServingHarness,
    delta_metadata,
    model_name,
    save,
    train,
    trainer_logprobs,
)


def _gap(harness: ServingHarness, deployment_id: str, client: Any) -> float:
    served = harness.score(deployment_id, SEQUENCE)
    return float((served - trainer_logprobs(client, SEQUENCE)).abs().max())


def _sampled_from(harness: ServingHarness, deployment_id: str) -> set[str | None]:
    """The snapshot identity a completion names, streamed (its final chunk) and not (its body
    and its header); one value when they agree."""
    response = harness.complete(deployment_id, prompt=SEQUENCE[:4], max_tokens=2)
    assert response.status_code == 200, response.text
    chunks, done = harness.stream(deployment_id, prompt=SEQUENCE[:4], max_tokens=2)
    assert done and all("snapshot_identity" not in chunk for chunk in chunks[:-1])
    return {
        response.json().get("snapshot_identity"),
        response.headers.get("x-fireworks-snapshot-identity"),
        chunks[-1].get("snapshot_identity"),
    }


def _module_names(module: torch.nn.Module) -> list[str]:
    return [name for name, _ in module.named_modules()]


def test_served_logprobs_equal_the_trainers_after_a_base_load_and_a_delta(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("parity-job")
    harness.deploy("parity", "parity-job")
    base_logprobs = harness.score("parity", SEQUENCE)
    assert _sampled_from(harness, "parity") == {None}  # base weights: no snapshot to name
    train(client)
    base = save(client, "step-1", "base")
    accepted = harness.hotload("parity", base)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"identity": base, "accepted": True}
    first = harness.wait_loaded("parity", base)
    assert _gap(harness, "parity", client) <= TOLERANCE
    assert _sampled_from(harness, "parity") == {base}
    assert float((harness.score("parity", SEQUENCE) - base_logprobs).abs().max()) > 1e-3

    train(client)
    delta = save(client, "step-2", "delta")
    assert harness.hotload("parity", delta, delta_metadata(base)).status_code == 200
    second = harness.wait_loaded("parity", delta)
    assert _gap(harness, "parity", client) <= TOLERANCE
    assert _sampled_from(harness, "parity") == {delta}
    assert second["weight_version"] > first["weight_version"]
    assert second["identity"] == first["identity"]  # the same replica (pod)
    assert harness.platform.state.deployments.served_snapshot("parity") == delta


def test_a_lora_adapter_loads_on_the_base_with_trainer_parity(harness: ServingHarness) -> None:
    client = harness.training_client("lora-job", lora_rank=8)
    harness.deploy("lora", "lora-job")
    for step in range(2):
        train(client)
        identity = save(client, f"step-{step}", "base")
        assert harness.hotload("lora", identity).status_code == 200
        replica = harness.wait_loaded("lora", identity)
        assert replica["loaded_adapters"] == [{"identity": identity, "status": "loaded"}]
        assert _gap(harness, "lora", client) <= TOLERANCE
    # Metadata on an adapter is refused: an adapter is always complete.
    train(client)
    adapter = save(client, "step-9", "base")
    assert harness.hotload("lora", adapter, delta_metadata(identity)).status_code == 200
    failed = harness.wait_error("lora", adapter)
    assert "only deltas take it" in failed["loading_state"]["message"]
    assert failed["current_snapshot_identity"] == identity and failed["readiness"]


def test_a_delta_must_follow_what_the_replica_serves(harness: ServingHarness) -> None:
    client = harness.training_client("chain-job")
    harness.deploy("chain", "chain-job")
    base = save(client, "s1", "base")
    assert harness.hotload("chain", base).status_code == 200
    harness.wait_loaded("chain", base)
    train(client, 1)
    skipped = save(client, "s2", "delta")  # saved, never loaded
    train(client, 1)
    last = save(client, "s3", "delta")

    # Claims the right predecessor, but the replica serves another one.
    assert harness.hotload("chain", last, delta_metadata(skipped)).status_code == 200
    failed = harness.wait_error("chain", last)
    message = failed["loading_state"]["message"]
    assert skipped in message and base in message
    assert (failed["current_snapshot_identity"], failed["readiness"]) == (base, True)
    # Claims what the replica serves, but the delta was saved against another snapshot.
    assert harness.hotload("chain", last, delta_metadata(base)).status_code == 200
    message = harness.wait_error("chain", last)["loading_state"]["message"]
    assert skipped in message and base in message
    # No metadata at all: a delta cannot be applied without its base.
    assert harness.hotload("chain", skipped).status_code == 200
    message = harness.wait_error("chain", skipped)["loading_state"]["message"]
    assert "cannot be applied without incremental_snapshot_metadata" in message
    # In order, the chain loads, and the weights are the trainer's.
    assert harness.hotload("chain", skipped, delta_metadata(base)).status_code == 200
    harness.wait_loaded("chain", skipped)
    assert harness.hotload("chain", last, delta_metadata(skipped)).status_code == 200
    harness.wait_loaded("chain", last)
    assert _gap(harness, "chain", client) <= TOLERANCE


def test_loads_alternate_between_two_models_and_construct_no_other(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("standby-job")
    harness.deploy("standby", "standby-job")
    replica = harness.platform.state.serving.replica("standby")
    assert replica is not None
    modules: set[int] = set()
    previous: str | None = None
    for step in range(3):  # a base load, then two deltas
        train(client, 1)
        identity = save(client, f"s{step}", "delta" if previous else "base")
        metadata = delta_metadata(previous) if previous else None
        assert harness.hotload("standby", identity, metadata).status_code == 200
        harness.wait_loaded("standby", identity)
        assert _gap(harness, "standby", client) <= TOLERANCE
        assert replica.model is not None and replica.standby is not None
        assert replica.model.module is not replica.standby.module
        modules |= {id(replica.model.module), id(replica.standby.module)}
        previous = identity
    assert len(modules) == 2  # the replaced weights' model is where the next load goes


def test_lora_loads_alternate_between_two_models_and_leave_no_lora_layers(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("lora-standby-job", lora_rank=8)
    harness.deploy("lora-standby", "lora-standby-job")
    replica = harness.platform.state.serving.replica("lora-standby")
    assert replica is not None and replica.model is not None
    layers = _module_names(replica.model.module)
    identities: dict[str, str] = {}
    expected: dict[str, torch.Tensor] = {}  # the trainer's logprobs when each was saved
    for name, kind in [("a", "base"), ("b", "base"), ("merged", "merged_base")]:
        train(client, 1)
        expected[name] = trainer_logprobs(client, SEQUENCE)
        identities[name] = save(client, name, kind)
    modules: set[int] = set()
    # B goes where the base was, the merged weights where A was, and A again where B was: each
    # adapter is merged into the base model's weights, never into what the standby held.
    for name in ["a", "b", "merged", "a"]:
        identity = identities[name]
        assert harness.hotload("lora-standby", identity).status_code == 200
        loaded = harness.wait_loaded("lora-standby", identity)
        adapters = [] if name == "merged" else [{"identity": identity, "status": "loaded"}]
        assert loaded["loaded_adapters"] == adapters
        gap = (harness.score("lora-standby", SEQUENCE) - expected[name]).abs().max()
        assert float(gap) <= TOLERANCE
        assert replica.model is not None and replica.standby is not None
        assert replica.model.module is not replica.standby.module
        for model in (replica.model, replica.standby):
            assert _module_names(model.module) == layers
            assert not any(isinstance(m, BaseTunerLayer) for m in model.module.modules())
            assert not hasattr(model.module, "peft_config")
        modules |= {id(replica.model.module), id(replica.standby.module)}
    assert len(modules) == 2


def test_a_lora_load_after_failed_loads_serves_the_trainers_exact_weights(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("lora-fail-job", lora_rank=8)
    harness.deploy("lora-fail", "lora-fail-job")
    replica = harness.platform.state.serving.replica("lora-fail")
    assert replica is not None and replica.model is not None
    layers = _module_names(replica.model.module)
    train(client)
    adapter = save(client, "adapter", "base")
    merged = save(client, "merged", "merged_base")  # the same weights, merged by the trainer
    directory = harness.platform.data_dir / "jobs" / "lora-fail-job" / "snapshots" / adapter
    weights = directory / "adapter_model.safetensors"
    original = weights.read_bytes()

    # An adapter of another rank, digests and all: PEFT's LoRA layers are in the standby when
    # its weights fail to load, so that standby is dropped and the next load builds another.
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, weights)
    write_marker(directory)
    assert harness.hotload("lora-fail", adapter).status_code == 200
    failed = harness.wait_error("lora-fail", adapter)
    assert (failed["current_snapshot_identity"], failed["readiness"]) == ("", True)
    assert replica.standby is None
    # A flipped byte in the adapter's last weight: PEFT merges it into the standby, then the
    # digest check refuses the load, and the standby keeps weights that no snapshot has.
    weights.write_bytes(original)
    write_marker(directory)
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert harness.hotload("lora-fail", adapter).status_code == 200
    message = harness.wait_error("lora-fail", adapter)["loading_state"]["message"]
    assert "fails its SHA-256 check" in message
    dirty = replica.standby
    assert dirty is not None

    # Repaired, the adapter loads into that standby, onto the base model's own weights.
    weights.write_bytes(original)
    assert harness.hotload("lora-fail", adapter).status_code == 200
    harness.wait_loaded("lora-fail", adapter)
    assert replica.model is dirty
    assert _module_names(dirty.module) == layers
    served = dirty.module.state_dict()
    for key, tensor in load_full_tensors(directory.with_name(merged)).items():
        assert torch.equal(served[key], tensor), key


def test_a_snapshot_failing_its_digest_or_checksums_changes_nothing_served(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("verify-job")
    harness.deploy("verify", "verify-job")
    base = save(client, "base", "base")
    assert harness.hotload("verify", base).status_code == 200
    harness.wait_loaded("verify", base)
    served = harness.score("verify", SEQUENCE)
    train(client)
    delta = save(client, "delta", "delta")
    directory = harness.platform.data_dir / "jobs" / "verify-job" / "snapshots" / delta
    weights = directory / "delta.safetensors"
    original = weights.read_bytes()
    # One flipped byte: the file no longer matches its marker (and the XOR its checksum; the
    # digest is what gets reported, although the build ran alongside its verification).
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert harness.hotload("verify", delta, delta_metadata(base)).status_code == 200
    message = harness.wait_error("verify", delta)["loading_state"]["message"]
    assert "fails its SHA-256 check" in message
    weights.write_bytes(original)
    # A consistent snapshot whose recorded checksum is wrong: the XOR result is refused.
    meta_path = directory / "snapshot.json"
    meta = json.loads(meta_path.read_text())
    name = sorted(meta["checksums"])[0]
    meta["checksums"][name] ^= 1
    meta_path.write_text(json.dumps(meta))
    write_marker(directory)
    assert harness.hotload("verify", delta, delta_metadata(base)).status_code == 200
    message = harness.wait_error("verify", delta)["loading_state"]["message"]
    assert "fails its Adler-32 check" in message and base in message
    (replica,) = harness.status("verify")
    assert (replica["current_snapshot_identity"], replica["readiness"]) == (base, True)
    assert torch.equal(harness.score("verify", SEQUENCE), served)
    # Repaired, the same delta loads exactly over the standby the failures wrote into.
    meta["checksums"][name] ^= 1
    meta_path.write_text(json.dumps(meta))
    write_marker(directory)
    assert harness.hotload("verify", delta, delta_metadata(base)).status_code == 200
    harness.wait_loaded("verify", delta)
    assert _gap(harness, "verify", client) <= TOLERANCE


def test_sampling_during_a_load_answers_425_then_serves_the_new_weights(
    harness: ServingHarness, slow_loads: None
) -> None:
    client = harness.training_client("busy-job")
    harness.deploy("busy", "busy-job")
    before = save(client, "before", "base")
    harness.hotload("busy", before)
    old = harness.wait_loaded("busy", before)
    train(client, 3)
    after = save(client, "after", "delta")
    assert harness.hotload("busy", after, delta_metadata(before)).status_code == 200

    busy = harness.complete("busy", prompt=SEQUENCE[:4], max_tokens=2)
    assert busy.status_code == 425, busy.text
    assert after in busy.json()["error"]["message"]
    # Until the new weights serve, the status still names the old ones, and is not ready: a
    # client that trusted an early identity change would sample stale weights.
    (loading,) = harness.status("busy")
    assert loading["loading_state"]["stage"] in ("downloading", "loading")
    assert loading["loading_state"]["target_snapshot_identity"] == after
    assert (loading["current_snapshot_identity"], loading["readiness"]) == (before, False)
    # A resent POST of the same load is accepted; another identity must wait its turn.
    assert harness.hotload("busy", after, delta_metadata(before)).status_code == 200
    other = harness.hotload("busy", before)
    assert other.status_code == 409 and after in other.json()["error"]["message"]

    loaded = harness.wait_loaded("busy", after)
    assert loaded["weight_version"] > old["weight_version"]
    assert _gap(harness, "busy", client) <= TOLERANCE
    # Loading what already serves is a no-op.
    assert harness.hotload("busy", after).status_code == 200
    assert harness.status("busy")[0]["weight_version"] == loaded["weight_version"]


def _held_status(
    harness: ServingHarness, deployment_id: str, identity: str, max_wait_s: float
) -> tuple[dict[str, Any], float]:
    """Replica 0 of a status held for the load of `identity` (the local extension), and how
    long the answer took."""
    started = time.monotonic()
    response = harness.http.get(
        HOTLOAD,
        params={"wait_for_identity": identity, "max_wait_s": max_wait_s},
        headers={
            "Authorization": f"Bearer {harness.api_key}",
            "fireworks-model": "tiny",
            "fireworks-deployment": model_name(deployment_id),
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["replicas"][0], time.monotonic() - started


def test_a_held_status_answers_when_the_load_ends_or_at_its_bound(
    harness: ServingHarness, slow_loads: None
) -> None:
    client = harness.training_client("held-job")
    harness.deploy("held", "held-job")
    first = save(client, "first", "base")
    # Held for `first`: answered when its load (1 s in `downloading`) ends, serving it, well
    # before the 5 s asked for (capped at 2 s).
    assert harness.hotload("held", first).status_code == 200
    replica, took = _held_status(harness, "held", first, max_wait_s=5.0)
    assert (replica["current_snapshot_identity"], replica["readiness"]) == (first, True)
    assert replica["loading_state"]["stage"] == "completed"
    assert 0.5 <= took < 1.9
    # A load that outlasts the hold: the answer comes at the bound, the load still running.
    train(client, 1)
    second = save(client, "second", "base")
    assert harness.hotload("held", second).status_code == 200
    replica, took = _held_status(harness, "held", second, max_wait_s=0.2)
    assert replica["loading_state"] == {
        "stage": "downloading",
        "target_snapshot_identity": second,
        "message": None,
    }
    assert took >= 0.2
    # Held for an identity that is not loading: answered at once (the load of `second`,
    # 1 s long, is still running when it comes).
    replica, _ = _held_status(harness, "held", first, max_wait_s=2.0)
    assert replica["loading_state"]["stage"] == "downloading"
    assert replica["current_snapshot_identity"] == first
    harness.wait_loaded("held", second)


def test_a_stale_error_for_another_target_leaves_the_status_usable(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("stale-job")
    harness.deploy("stale", "stale-job")
    good = save(client, "good", "base")
    train(client, 1)
    orphan = save(client, "orphan", "delta")
    assert harness.hotload("stale", orphan).status_code == 200
    assert harness.wait_error("stale", orphan)["current_snapshot_identity"] == ""
    # The error names its own target, so a client waiting for `good` is not misled.
    assert harness.hotload("stale", good).status_code == 200
    replica = harness.wait_loaded("stale", good)
    assert replica["loading_state"]["target_snapshot_identity"] == good
    assert replica["loading_state"]["stage"] in ("completed", "idle")


@pytest.fixture(scope="module")
def mine_snapshot(harness: ServingHarness) -> str:
    """A snapshot of trainer "mine-job"; deployments "theirs" (another trainer) and "unlinked"."""
    mine = harness.training_client("mine-job")
    harness.create_job("theirs-job")
    harness.deploy("theirs", "theirs-job")
    harness.deploy("unlinked")
    return save(mine, "snap", "base")


@pytest.mark.parametrize(
    ("case", "status", "fragments"),
    [
        ("wrong base model", 400, ("smollm2-135m", "tiny")),
        ("another trainer's snapshot", 404, ("theirs-job", "mine-job")),
        ("no linked trainer", 400, ("no hotLoadTrainerJob",)),
        ("unknown field", 400, ("extra inputs are not permitted",)),
        ("bad compression format", 400, ("compression_format", "arc_v2")),
        ("bad checksum format", 400, ("checksum_format", "alder32")),
        ("missing deployment header", 400, ("fireworks-deployment",)),
        ("unknown deployment", 404, ("nowhere",)),
    ],
)
def test_bad_hotloads_are_refused_before_any_load(
    harness: ServingHarness,
    mine_snapshot: str,
    case: str,
    status: int,
    fragments: tuple[str, ...],
) -> None:
    snapshot = mine_snapshot
    deployment, kwargs = "theirs", dict[str, Any]()
    if case == "wrong base model":
        kwargs["model"] = "smollm2-135m"
    elif case == "no linked trainer":
        deployment = "unlinked"
    elif case == "unknown field":
        kwargs["priority"] = "high"
    elif case == "bad compression format":
        kwargs["metadata"] = delta_metadata("x", compression_format="zstd")
    elif case == "bad checksum format":
        kwargs["metadata"] = delta_metadata("x", checksum_format="adler32")
    elif case == "unknown deployment":
        deployment = "nowhere"
    if case == "missing deployment header":
        headers = {"fireworks-model": "tiny"}
        response = harness.http.post(
            "/hot_load/v1/models/hot_load", json={"identity": snapshot}, headers=headers
        )
    else:
        response = harness.hotload(deployment, snapshot, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(fragment in message for fragment in fragments), message
    (replica,) = harness.status("theirs")
    assert replica["current_snapshot_identity"] == ""
    assert replica["loading_state"]["stage"] == "idle"


def test_the_status_lists_no_replica_until_the_base_weights_are_in(
    harness: ServingHarness,
) -> None:
    settings = harness.platform.state.serving.settings
    harness.platform.state.serving.settings = settings.model_copy(update={"start_delay_s": 1.0})
    try:
        created = harness.http.post(
            DEPLOYMENTS, params={"deploymentId": "slow"}, json={"baseModel": "tiny"}
        )
        assert created.status_code == 200
        assert harness.status("slow") == []
        assert harness.deployment("slow")["state"] == "CREATING"
        early = harness.complete("slow", prompt=SEQUENCE[:3], max_tokens=1)
        assert early.status_code == 425, early.text
        harness.wait_state("slow", "READY")
        (replica,) = harness.status("slow")
        assert replica["readiness"] and replica["current_snapshot_identity"] == ""
    finally:
        harness.platform.state.serving.settings = settings


def test_scaled_to_zero_the_weights_unload_and_a_request_brings_the_base_back(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("zero-job")
    harness.deploy("zero", "zero-job")
    base_logprobs = harness.score("zero", SEQUENCE)
    train(client)
    snapshot = save(client, "s1", "base")
    harness.hotload("zero", snapshot)
    before = harness.wait_loaded("zero", snapshot)
    scaled = harness.http.patch(
        f"{DEPLOYMENTS}/zero", json={"minReplicaCount": 0, "maxReplicaCount": 0}
    )
    assert scaled.status_code == 200, scaled.text
    assert harness.status("zero") == []
    assert harness.platform.state.deployments.served_snapshot("zero") == ""

    # The request waits for a new replica with the base weights, like a new pod.
    assert torch.allclose(harness.score("zero", SEQUENCE), base_logprobs, atol=1e-6)
    (after,) = harness.status("zero")
    assert after["current_snapshot_identity"] == "" and after["identity"] != before["identity"]
    assert after["weight_version"] > before["weight_version"]


def test_reattaching_restarts_the_replica_and_resets_the_snapshot(
    harness: ServingHarness,
) -> None:
    client = harness.training_client("first-job")
    harness.create_job("second-job")
    harness.deploy("moved", "first-job")
    snapshot = save(client, "s1", "base")
    harness.hotload("moved", snapshot)
    before = harness.wait_loaded("moved", snapshot)
    patched = harness.http.patch(
        f"{DEPLOYMENTS}/moved",
        params={"updateMask": "hot_load_trainer_job"},
        json={"hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/second-job"},
    )
    assert patched.json()["state"] == "UPDATING"
    harness.wait_state("moved", "READY")
    (after,) = harness.status("moved")
    assert after["identity"] != before["identity"]  # a new pod, as `reattach_trainer` expects
    assert after["current_snapshot_identity"] == "" and after["readiness"]
    # The old trainer's snapshot is no longer reachable from this deployment.
    refused = harness.hotload("moved", snapshot)
    assert refused.status_code == 404 and "second-job" in refused.json()["error"]["message"]


def test_a_deleted_deployment_stops_serving(harness: ServingHarness) -> None:
    harness.deploy("gone")
    assert harness.complete("gone", prompt=SEQUENCE[:3], max_tokens=1).status_code == 200
    assert harness.http.delete(f"{DEPLOYMENTS}/gone").status_code == 200
    response = harness.complete("gone", prompt=SEQUENCE[:3], max_tokens=1)
    assert response.status_code == 404 and "not found" in response.json()["error"]["message"]
