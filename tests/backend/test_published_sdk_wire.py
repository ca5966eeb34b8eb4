"""What the published Fireworks SDK (and its recipes) send, accepted by the local platform.

Each test sends the request the published client sends (fields and paths read from its source,
recorded in docs/platform-contract.md) to a real `LocalPlatform` over HTTP: the trainer-job
create fields of releases >= 1.2.9, shape listings under the wildcard parent with the recipes'
filters, model and deployment-shape reads, a re-used sampler snapshot name, the checkpoint
forms `load_state` accepts, and error messages that never show the server's data directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from backend import LocalPlatform
from sdk import BadRequestError, FiretitanServiceClient, FireworksError
from tests.trainer_support import ACCOUNT, BATCH, FAST_TIMINGS, TrainerPlatform

JOBS = f"/v1/accounts/{ACCOUNT}/rlorTrainerJobs"
ADAM = types.AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    return message


def _names(response: httpx.Response, key: str) -> list[str]:
    assert response.status_code == 200, response.text
    return [version["name"].split("/")[3] for version in response.json()[key]]


# ---------------------------------------------------------------- trainer-job create


def test_create_accepts_the_reservation_fields_on_every_path(tp: TrainerPlatform) -> None:
    manual = {
        "serviceMode": True,
        "keepAlive": False,
        "dataset": "",
        "trainingConfig": {"baseModel": "tiny", "loraRank": 0, "learningRate": 1e-4},
        "useReservation": True,
        "nodeCount": 1,
    }
    response = tp.http.post(
        JOBS, params={"skipValidations": "true", "rlorTrainerJobId": "manual-path"}, json=manual
    )
    assert response.status_code == 200, response.text
    assert response.json()["useReservation"] is True
    shaped = {
        "serviceMode": True,
        "keepAlive": False,
        "dataset": "",
        "trainingConfig": {"baseModel": "tiny", "loraRank": 4, "projectionHeadDim": 8},
        "useReservation": False,
        "reservationTarget": "accounts/local/reservations/r-1",
        "extraValues": {"team": "rl"},
    }
    response = tp.http.post(
        JOBS,
        params={
            "trainingShape": f"accounts/{ACCOUNT}/trainingShapes/tiny-cpu-lora",
            "rlorTrainerJobId": "shape-path",
        },
        json=shaped,
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["reservationTarget"] == "accounts/local/reservations/r-1"
    assert job["extraValues"] == {"team": "rl"}
    assert job["trainingConfig"]["projectionHeadDim"] == 8
    # A typo is still refused, by name.
    typo = {**manual, "useReservations": True}
    message = _error(tp.http.post(JOBS, params={"rlorTrainerJobId": "typo"}, json=typo), 400)
    assert "useReservations" in message


# ---------------------------------------------------------------- shapes and models


def test_recipes_select_shapes_under_the_wildcard_parent(tp: TrainerPlatform) -> None:
    listing = "/v1/accounts/-/trainingShapes/-/versions"
    exact = (
        'snapshot.base_model="accounts/fireworks/models/tiny" AND '
        'snapshot.trainer_mode="LORA_TRAINER" AND latest_validated=true'
    )
    params = {"filter": exact, "orderBy": "create_time desc", "pageSize": 200}
    assert _names(tp.http.get(listing, params=params), "trainingShapeVersions") == ["tiny-cpu-lora"]
    # The fallback: architecture and a parameter-count bucket.
    compatible = (
        'snapshot.model_type="qwen3" AND snapshot.parameter_count>=0 AND '
        "snapshot.parameter_count<=1000000000 AND latest_validated=true AND "
        'snapshot.trainer_mode="FORWARD_ONLY"'
    )
    response = tp.http.get(listing, params={"filter": compatible, "pageSize": 200})
    assert _names(response, "trainingShapeVersions") == [
        "tiny-chatml-cpu-forward",
        "tiny-cpu-forward",
    ]
    # The SDK's own unversioned resolution is unchanged.
    response = tp.http.get(
        f"/v1/accounts/{ACCOUNT}/trainingShapes/tiny-cpu/versions",
        params={"filter": "latest_validated=true", "pageSize": 1},
    )
    (version,) = response.json()["trainingShapeVersions"]
    assert version["snapshot"]["trainerMode"] == "POLICY_TRAINER"
    # What our own training shape advertises as its deployment shape can be read.
    deployment_shape = version["snapshot"]["deploymentShapeVersion"]
    served = tp.http.get(f"/v1/{deployment_shape}")
    assert served.status_code == 200, served.text
    assert served.json()["name"] == deployment_shape
    assert served.json()["snapshot"]["baseModel"] == "fireloop/tiny"
    deployment_filter = (
        'snapshot.base_model="tiny" AND latest_validated=true AND snapshot.engine!="FIREATTENTION"'
    )
    response = tp.http.get(
        "/v1/accounts/-/deploymentShapes/-/versions", params={"filter": deployment_filter}
    )
    assert _names(response, "deploymentShapeVersions") == ["tiny-local"]


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ({"filter": 'snapshot.colour="red"'}, ("snapshot.colour",)),
        ({"filter": 'snapshot.trainer_mode>="A"'}, ("snapshot.trainer_mode", "only = and !=")),
        ({"filter": "snapshot.parameter_count>=many"}, ("many",)),
        ({"filter": "latest_validated"}, ("latest_validated",)),
        ({"orderBy": "size"}, ("orderBy", "size")),
        ({"pageToken": "next"}, ("pageToken",)),
    ],
    ids=["unknown-field", "ordered-string", "not-a-number", "no-operator", "order", "token"],
)
def test_bad_shape_listings_are_refused_by_name(
    tp: TrainerPlatform, params: dict[str, str], fragments: tuple[str, ...]
) -> None:
    message = _error(tp.http.get("/v1/accounts/-/trainingShapes/-/versions", params=params), 400)
    assert all(fragment in message for fragment in fragments), message


def test_only_the_wildcard_or_own_account_lists_shapes(tp: TrainerPlatform) -> None:
    response = tp.http.get("/v1/accounts/other/trainingShapes/-/versions")
    assert response.status_code == 403, response.text
    response = tp.http.get("/v1/accounts/-/trainingShapes/tiny-cpu/versions/1")
    assert response.status_code == 403, response.text


def test_base_models_are_readable_with_their_details(tp: TrainerPlatform) -> None:
    for account in (ACCOUNT, "fireworks"):
        response = tp.http.get(f"/v1/accounts/{account}/models/tiny")
        assert response.status_code == 200, response.text
        model = response.json()
        assert model["name"] == f"accounts/{account}/models/tiny"
        assert model["kind"] == "HF_BASE_MODEL"
        assert model["baseModelDetails"]["modelType"] == "qwen3"
        assert int(model["baseModelDetails"]["parameterCount"]) == 330_000
        assert model["baseModelDetails"]["supportsFireattention"] is False
    assert "gpt-5" in _error(tp.http.get(f"/v1/accounts/{ACCOUNT}/models/gpt-5"), 404)
    assert tp.http.get("/v1/accounts/other/models/tiny").status_code == 403


# ---------------------------------------------------------------- snapshots, states, promotion


def _marker(tp: TrainerPlatform, job_id: str, name: str) -> bytes:
    return (tp.platform.data_dir / "jobs" / job_id / "snapshots" / name / "COMPLETE").read_bytes()


def test_a_reused_snapshot_name_overwrites_and_the_row_promotes(tp: TrainerPlatform) -> None:
    with FiretitanServiceClient(tp.create_job("reuse"), tp.api_key) as service:
        client = service.create_training_client("tiny")
        first = client.save_weights_for_sampler_ext("snap", checkpoint_type="base")
        before = _marker(tp, "reuse", first.snapshot_name)
        client.forward_backward(BATCH, "cross_entropy").result()
        client.optim_step(ADAM).result()
        again = client.save_weights_for_sampler_ext("snap", checkpoint_type="base")
        assert again.snapshot_name == first.snapshot_name
        assert _marker(tp, "reuse", again.snapshot_name) != before  # new weights, same name
        with pytest.raises(BadRequestError, match="base of this delta"):
            client.save_weights_for_sampler_ext("snap", checkpoint_type="delta")
    (row,) = tp.checkpoint_rows("reuse")
    assert row["promotable"] is True
    body = {
        "output_model": f"accounts/{ACCOUNT}/models/reused-snap",
        "trainer_job_id": f"accounts/{ACCOUNT}/rlorTrainerJobs/reuse",
        "base_model": f"accounts/{ACCOUNT}/models/tiny",
        "async_promotion": True,
    }
    checkpoint = row["name"].rsplit("/", 1)[-1]
    promoted = tp.http.post(f"/v1/accounts/{ACCOUNT}/checkpoints/{checkpoint}:promote", json=body)
    assert promoted.status_code == 200, promoted.text
    model = tp.http.get(f"/v1/accounts/{ACCOUNT}/models/reused-snap")
    assert model.status_code == 200, model.text
    assert model.json() == promoted.json()["model"]


def test_a_sampler_path_saved_again_samples_the_new_weights(tp: TrainerPlatform) -> None:
    service = tinker.ServiceClient(
        base_url=tp.create_job("resample", lora_rank=8),
        api_key="tml-local-test",
        default_headers={"Authorization": f"Bearer {tp.api_key}"},
    )
    try:
        client = service.create_lora_training_client("fireloop/tiny", rank=8)
        prompt = BATCH[0].model_input
        path = client.save_weights_for_sampler("same").result().path
        before = service.create_sampling_client(model_path=path).compute_logprobs(prompt).result()
        client.forward_backward(BATCH, "cross_entropy").result()
        client.optim_step(ADAM).result()
        assert client.save_weights_for_sampler("same").result().path == path
        after = service.create_sampling_client(model_path=path).compute_logprobs(prompt).result()
        assert after[1:] != before[1:]  # the trainer's cached sampler model was not reused
    finally:
        service.holder.close()  # type: ignore[no-untyped-call]  # stops the heartbeat


def test_states_load_by_name_and_cross_job_reference(tp: TrainerPlatform) -> None:
    with FiretitanServiceClient(tp.create_job("states"), tp.api_key) as service:
        client = service.create_training_client("tiny")
        client.save_state("state-a").result()
        # The forms the published SDK lets through: a logical name, cross_job://<job>/<name>.
        assert client.load_state("state-a").result().path == "state-a"
        cross = "cross_job://states/state-a"
        assert client.load_state_with_optimizer(cross).result().path == cross


# ---------------------------------------------------------------- no absolute paths in errors


def _hidden_roots(tp: TrainerPlatform) -> list[str]:
    data_dir = tp.platform.data_dir
    return [str(data_dir), os.path.realpath(data_dir)]


def _shows_no_root(tp: TrainerPlatform, message: str) -> None:
    assert all(root not in message for root in _hidden_roots(tp)), message


def test_error_messages_never_show_the_data_dir(tp: TrainerPlatform) -> None:
    with FiretitanServiceClient(tp.create_job("paths"), tp.api_key) as service:
        client = service.create_training_client("tiny")
        client.save_state("kept").result()
        with pytest.raises(FireworksError) as exists:
            client.save_state("kept").result()  # a second save of the name: refused
        _shows_no_root(tp, str(exists.value))
        assert "jobs/paths/checkpoints/kept" in str(exists.value)
        # A damaged checkpoint: its weights file is gone.
        state_dir = tp.state_dir("paths", "kept")
        next(p for p in state_dir.iterdir() if p.suffix == ".safetensors").unlink()
        with pytest.raises(FireworksError) as damaged:
            client.load_state("kept").result()
        _shows_no_root(tp, str(damaged.value))
        assert "jobs/paths/checkpoints/kept" in str(damaged.value)
        snapshot = client.save_weights_for_sampler_ext("snap", checkpoint_type="base")
    promote = f"/v1/accounts/{ACCOUNT}/checkpoints/{snapshot.snapshot_name}:promote"
    body: dict[str, Any] = {
        "output_model": f"accounts/{ACCOUNT}/models/paths-snap",
        "trainer_job_id": f"accounts/{ACCOUNT}/rlorTrainerJobs/paths",
    }
    assert tp.http.post(promote, json=body).status_code == 200
    _shows_no_root(tp, _error(tp.http.post(promote, json=body), 409))
    corrupt_body = {**body, "output_model": f"accounts/{ACCOUNT}/models/paths-other"}
    state_promote = f"/v1/accounts/{ACCOUNT}/checkpoints/kept:promote"
    _shows_no_root(tp, _error(tp.http.post(state_promote, json=corrupt_body), 400))
