"""A sampler snapshot saved again under the same name (the published SDK overwrites re-used
names) is loaded again by a hotload of that name, not taken for the snapshot already served."""

from __future__ import annotations

import time
from typing import Any

from tests.backend.serving.conftest import (
    SEQUENCE,
    TOLERANCE,
    ServingHarness,
    save,
    train,
    trainer_logprobs,
)


def _wait_version_after(
    harness: ServingHarness, deployment_id: str, version: int
) -> dict[str, Any]:
    """The replica once it serves a weight version newer than `version` (a load finished)."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        replica = harness.status(deployment_id)[0]
        if replica["weight_version"] > version and replica["readiness"]:
            return replica
        time.sleep(0.01)
    raise AssertionError(f"{deployment_id} never loaded past weight version {version}")


def test_a_resaved_snapshot_name_is_loaded_again(harness: ServingHarness) -> None:
    client = harness.training_client("resave-job")
    harness.deploy("resave", "resave-job")
    train(client)
    name = save(client, "same", "base")
    assert harness.hotload("resave", name).status_code == 200
    first = harness.wait_loaded("resave", name)
    train(client)
    assert save(client, "same", "base") == name  # the name is re-used: the files replaced
    assert harness.hotload("resave", name).status_code == 200
    second = _wait_version_after(harness, "resave", first["weight_version"])
    assert second["current_snapshot_identity"] == name
    served = harness.score("resave", SEQUENCE)
    assert float((served - trainer_logprobs(client, SEQUENCE)).abs().max()) <= TOLERANCE
    # Sent again with nothing saved in between, it is the snapshot already served.
    assert harness.hotload("resave", name).status_code == 200
    assert harness.wait_loaded("resave", name)["weight_version"] == second["weight_version"]
