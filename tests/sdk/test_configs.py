"""Config models: the seed's defaults, the exact create requests, and the table of bad inputs
that must each fail with a `ConfigError` naming the field — before anything is sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

import sdk
from sdk import (
    ConfigError,
    DeploymentConfig,
    DeploymentManager,
    FireworksSettings,
    RetryPolicy,
    TrainerJobConfig,
    TrainerJobManager,
    TrainingShapeProfile,
)
from sdk.deployment_config import build_deployment_request
from sdk.settings import resolve_api_key
from sdk.trainer_config import build_create_request, duration_string
from tests.sdk.fakes import API_KEY, BASE_URL, FakeClock, FakeControlPlane

SHAPE = "accounts/fireworks/trainingShapes/qwen3-8b"

# -- defaults: the seed's tables are the public API ---------------------------------------------

TRAINER_DEFAULTS: dict[str, Any] = {
    "lora_rank": 0,
    "max_context_length": 4096,
    "learning_rate": 1e-5,
    "gradient_accumulation_steps": 1,
    "node_count": 1,
    "display_name": None,
    "hot_load_deployment_id": None,
    "region": None,
    "custom_image_tag": None,
    "extra_args": None,
    "accelerator_type": None,
    "accelerator_count": None,
    "skip_validations": False,
    "forward_only": False,
    "trainer_replica_count": None,
    "training_shape_ref": None,
    "auto_select_training_shape": False,
    "inactivity_timeout": None,
    "requested_job_id": None,
}
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "deployment_shape": None,
    "region": "US_VIRGINIA_1",
    "min_replica_count": 0,
    "max_replica_count": 1,
    "accelerator_type": "NVIDIA_H200_141GB",
    "hot_load_bucket_type": "FW_HOSTED",
    "skip_shape_validation": False,
    "extra_args": None,
    "enable_hot_load": True,
    "for_training": False,
}


@pytest.mark.parametrize(("field", "default"), TRAINER_DEFAULTS.items())
def test_trainer_config_defaults_match_the_seed(field: str, default: object) -> None:
    assert getattr(TrainerJobConfig(base_model="m"), field) == default


@pytest.mark.parametrize(("field", "default"), DEPLOYMENT_DEFAULTS.items())
def test_deployment_config_defaults_match_the_seed(field: str, default: object) -> None:
    assert getattr(DeploymentConfig(deployment_id="d", base_model="m"), field) == default


# -- exact wire requests ------------------------------------------------------------------------


def test_manual_path_create_request() -> None:
    config = TrainerJobConfig(
        base_model="accounts/fireworks/models/qwen3-8b",
        lora_rank=16,
        accelerator_type="NVIDIA_H200_141GB",
        accelerator_count=8,
        node_count=2,
        region="US_VIRGINIA_1",
        extra_args=["--a 1", "--b"],
        display_name="demo",
        inactivity_timeout=timedelta(minutes=30),
        preemptible=True,
    )
    query, body = build_create_request(config, "job-1")
    assert query == {"rlorTrainerJobId": "job-1", "skipValidations": "true"}
    assert body == {
        "serviceMode": True,
        "keepAlive": False,
        "dataset": "",
        "trainingConfig": {
            "baseModel": "accounts/fireworks/models/qwen3-8b",
            "loraRank": 16,
            "learningRate": 1e-5,
            "maxContextLength": 4096,
            "region": "US_VIRGINIA_1",
            "acceleratorType": "NVIDIA_H200_141GB",
            "acceleratorCount": 8,
            "extraArgs": ["--a", "1", "--b"],
        },
        "nodeCount": 2,
        "displayName": "demo",
        "preemptible": True,
        "inactivityTimeout": "1800s",
    }


def test_shape_path_create_request_omits_manual_fields() -> None:
    config = TrainerJobConfig(
        base_model="m",
        training_shape_ref=f"{SHAPE}/versions/3",
        skip_validations=True,
        trainer_replica_count=2,
        forward_only=True,
        custom_image_tag="v9",
    )
    query, body = build_create_request(config, "job-2")
    assert query == {
        "rlorTrainerJobId": "job-2",
        "trainingShape": f"{SHAPE}/versions/3",
        "skipValidations": "true",
    }
    assert body["trainingConfig"] == {
        "baseModel": "m",
        "loraRank": 0,
        "learningRate": 1e-5,
        "customImageTag": "v9",
    }
    assert "nodeCount" not in body
    assert body["trainerReplicaCount"] == 2
    assert body["forwardOnly"] is True
    assert "preemptible" not in body  # flags are sent only when enabled


def test_auto_shape_path_sends_neither_shape_nor_skip_validations() -> None:
    query, body = build_create_request(
        TrainerJobConfig(base_model="m", auto_select_training_shape=True), "job-3"
    )
    assert query == {"rlorTrainerJobId": "job-3"}
    assert body["trainingConfig"]["maxContextLength"] == 4096
    assert "nodeCount" not in body


def test_deprecated_deployment_link_goes_in_query_and_body() -> None:
    query, body = build_create_request(
        TrainerJobConfig(base_model="m", hot_load_deployment_id="dep-1"), "job-4"
    )
    assert query["deploymentId"] == "dep-1"
    assert body["hotLoadDeploymentId"] == "dep-1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(seconds=90), "90s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(0), "0s"),
        (timedelta(hours=1), "3600s"),
        (timedelta(microseconds=250), "0.00025s"),
        ("600s", "600s"),
    ],
)
def test_duration_string(value: timedelta | str, expected: str) -> None:
    assert duration_string(value) == expected


def test_deployment_request_manual_and_shape() -> None:
    manual = DeploymentConfig(
        deployment_id="dep-1",
        base_model="m",
        hot_load_trainer_job="job-1",
        extra_args=["--x 1"],
        annotations={"team": "rl"},
        skip_shape_validation=True,
    )
    query, body = build_deployment_request(manual, "acct")
    assert query == {"deploymentId": "dep-1", "skipShapeValidation": "true"}
    assert body == {
        "baseModel": "m",
        "description": "Fireworks training deployment",
        "minReplicaCount": 0,
        "maxReplicaCount": 1,
        "enableHotLoad": True,
        "forTraining": False,
        "placement": {"region": "US_VIRGINIA_1"},
        "hotLoadBucketType": "FW_HOSTED",
        "hotLoadTrainerJob": "accounts/acct/rlorTrainerJobs/job-1",
        "acceleratorType": "NVIDIA_H200_141GB",
        "extraArgs": ["--x", "1"],
        "annotations": {"team": "rl"},
    }
    profile = TrainingShapeProfile(
        training_shape_version=f"{SHAPE}/versions/3",
        deployment_shape_version="accounts/fireworks/deploymentShapes/q/versions/1",
    )
    shaped = DeploymentConfig.from_training_profile(
        deployment_id="dep-2", base_model="m", profile=profile, disable_speculative_decoding=True
    )
    shaped.validate()
    query, body = build_deployment_request(shaped, "acct")
    assert query == {"deploymentId": "dep-2", "disableSpeculativeDecoding": "true"}
    assert body["deploymentShape"] == "accounts/fireworks/deploymentShapes/q/versions/1"
    assert "acceleratorType" not in body  # the shape wins


def test_trainer_config_is_mutable_but_validated() -> None:
    config = TrainerJobConfig(base_model="m")
    config.lora_rank = 32
    assert config.lora_rank == 32
    with pytest.raises(ConfigError, match="lora_rank"):
        config.lora_rank = -1
    assert config.lora_rank == 32


def test_settings_from_env_and_key_resolution() -> None:
    env = {"FIREWORKS_API_KEY": "fw-k", "FIREWORKS_BASE_URL": "http://127.0.0.1:8000/"}
    settings = FireworksSettings.from_env(env)
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "fw-k"
    assert "fw-k" not in repr(settings)
    assert settings.base_url == "http://127.0.0.1:8000"
    assert settings.resolved_inference_url == "http://127.0.0.1:8000"
    assert FireworksSettings.from_env({}).base_url == "https://api.fireworks.ai"
    assert resolve_api_key("explicit", env) == "explicit"
    assert resolve_api_key(None, env) == "fw-k"


def test_retry_policy_is_frozen() -> None:
    with pytest.raises(ConfigError):
        RetryPolicy().max_wait_s = 1.0  # type: ignore[misc]


# -- bad inputs: each one a ConfigError naming the field, with nothing sent ----------------------


@dataclass
class Managers:
    trainers: TrainerJobManager
    deployments: DeploymentManager


def trainer(**fields: Any) -> TrainerJobConfig:
    return TrainerJobConfig(**{"base_model": "m", **fields})


def deployment(**fields: Any) -> DeploymentConfig:
    return DeploymentConfig(**{"deployment_id": "d", "base_model": "m", **fields})


NO_SHAPE_PROFILE = TrainingShapeProfile()
Attempt = Callable[[Managers], object]

BAD_INPUTS = [
    pytest.param(lambda m: trainer(lora_rank=-1), "lora_rank", id="negative-lora-rank"),
    pytest.param(lambda m: trainer(base_model=""), "base_model", id="empty-base-model"),
    pytest.param(lambda m: trainer(max_context_length=0), "max_context_length", id="zero-context"),
    pytest.param(lambda m: trainer(learning_rate=0), "learning_rate", id="zero-lr"),
    pytest.param(lambda m: trainer(learning_rate=float("nan")), "learning_rate", id="nan-lr"),
    pytest.param(
        lambda m: trainer(gradient_accumulation_steps=0),
        "gradient_accumulation_steps",
        id="zero-grad-accum",
    ),
    pytest.param(lambda m: trainer(node_count=0), "node_count", id="zero-nodes"),
    pytest.param(lambda m: trainer(display_name="x" * 64), "display_name", id="long-name"),
    pytest.param(
        lambda m: trainer(training_shape_ref="qwen3-8b"), "training_shape_ref", id="bad-shape-ref"
    ),
    pytest.param(lambda m: trainer(requested_job_id="My_Job"), "requested_job_id", id="bad-id"),
    pytest.param(lambda m: trainer(requested_job_id="a" * 64), "requested_job_id", id="long-id"),
    pytest.param(
        lambda m: trainer(inactivity_timeout="5m"), "inactivity_timeout", id="inactivity-minutes"
    ),
    pytest.param(
        lambda m: trainer(inactivity_timeout="-5s"), "inactivity_timeout", id="inactivity-negative"
    ),
    pytest.param(
        lambda m: trainer(inactivity_timeout=timedelta(hours=4)),
        "inactivity_timeout",
        id="inactivity-too-long",
    ),
    pytest.param(lambda m: trainer(epochs=3), "epochs", id="managed-epochs"),
    pytest.param(
        lambda m: TrainerJobConfig.model_validate({"base_model": "m", "batch_size": 8}),
        "batch_size",
        id="managed-batch-size-via-model-validate",
    ),
    pytest.param(
        lambda m: trainer(dataset="accounts/a/datasets/d"), "dataset", id="managed-dataset"
    ),
    pytest.param(lambda m: trainer(lora_alpha=32), "lora_alpha", id="unknown-field"),
    pytest.param(lambda m: setattr(trainer(), "epochs", 2), "epochs", id="unknown-attribute"),
    pytest.param(
        lambda m: trainer(training_shape_ref=SHAPE, auto_select_training_shape=True).validate(),
        "auto_select_training_shape",
        id="shape-and-auto",
    ),
    pytest.param(
        lambda m: trainer(training_shape_ref=SHAPE, accelerator_type="X").validate(),
        "accelerator_type",
        id="shape-with-accelerator",
    ),
    pytest.param(
        lambda m: trainer(auto_select_training_shape=True, node_count=2).validate(),
        "node_count",
        id="auto-with-nodes",
    ),
    pytest.param(lambda m: deployment(deployment_id="Dep 1"), "deployment_id", id="bad-dep-id"),
    pytest.param(
        lambda m: deployment(min_replica_count=2).validate(),
        "max_replica_count",
        id="max-below-min-replicas",
    ),
    pytest.param(
        lambda m: deployment(expected_deployment_shape="s").validate(),
        "expected_deployment_shape",
        id="unexpected-shape",
    ),
    pytest.param(
        lambda m: deployment(hot_load_bucket_type="GCS"), "hot_load_bucket_type", id="bucket-type"
    ),
    pytest.param(
        lambda m: deployment(hot_load_trainer_job="accounts/a/jobs/j"),
        "hot_load_trainer_job",
        id="bad-trainer-link",
    ),
    pytest.param(
        lambda m: DeploymentConfig.from_training_profile(
            deployment_id="d", base_model="m", profile=NO_SHAPE_PROFILE
        ),
        "profile",
        id="profile-without-deployment-shape",
    ),
    pytest.param(lambda m: resolve_api_key(None, {}), "FIREWORKS_API_KEY", id="no-api-key"),
    pytest.param(lambda m: resolve_api_key("fw-abc\n"), "api_key", id="key-with-newline"),
    pytest.param(
        lambda m: TrainerJobManager(API_KEY, BASE_URL, account_id="acct"),
        "account_id",
        id="account-id-removed",
    ),
    pytest.param(
        lambda m: DeploymentManager(API_KEY, BASE_URL, account_id=None),
        "account_id",
        id="account-id-removed-even-none",
    ),
    pytest.param(
        lambda m: TrainerJobManager(API_KEY, "api.fireworks.ai"), "base_url", id="bad-base-url"
    ),
    pytest.param(
        lambda m: DeploymentManager(API_KEY, BASE_URL, inference_url="localhost:80"),
        "inference_url",
        id="bad-inference-url",
    ),
    pytest.param(lambda m: FireworksSettings(base_url="ftp://x"), "base_url", id="settings-url"),
    pytest.param(
        lambda m: m.trainers.list_checkpoints("job-1", page_size=0), "page_size", id="page-size-0"
    ),
    pytest.param(
        lambda m: m.trainers.list_checkpoints("job-1", page_size=True),
        "page_size",
        id="page-size-bool",
    ),
    pytest.param(lambda m: m.trainers.get("../other"), "job_id", id="path-traversal-job-id"),
    pytest.param(
        lambda m: m.trainers.resolve_training_profile("trainingShapes/x"),
        "training_shape_id",
        id="bad-shape-id",
    ),
    pytest.param(
        lambda m: m.trainers.wait_for_ready("job-1", poll_interval_s=0),
        "poll_interval_s",
        id="zero-poll-interval",
    ),
    pytest.param(
        lambda m: m.trainers.reconnect_and_wait("job-1", transitional_poll_s=float("inf")),
        "transitional_poll_s",
        id="infinite-transitional-poll",
    ),
    pytest.param(
        lambda m: m.deployments.wait_for_ready("d", timeout_s=-1), "timeout_s", id="neg-timeout"
    ),
    pytest.param(
        lambda m: m.deployments.update("d", {"minReplicaCount": 1}, []),
        "update_mask",
        id="empty-update-mask",
    ),
    pytest.param(
        lambda m: m.deployments.update("d", {}, ["minReplicaCount"]),
        "update_mask",
        id="camel-case-update-mask",
    ),
    pytest.param(lambda m: RetryPolicy(jitter=2.0), "jitter", id="retry-jitter"),
]


@pytest.mark.parametrize(("attempt", "field"), BAD_INPUTS)
def test_bad_input_is_a_config_error_naming_the_field(
    attempt: Attempt, field: str, fake: FakeControlPlane, clock: FakeClock
) -> None:
    managers = Managers(
        TrainerJobManager(API_KEY, BASE_URL, transport=fake.transport(), sleep=clock.sleep),
        DeploymentManager(API_KEY, BASE_URL, transport=fake.transport(), sleep=clock.sleep),
    )
    with pytest.raises(ConfigError) as caught:
        attempt(managers)
    assert field in str(caught.value)
    assert fake.requests == []  # rejected before anything went on the wire


def test_validate_lists_every_problem_at_once() -> None:
    config = TrainerJobConfig(
        base_model="m",
        training_shape_ref=SHAPE,
        accelerator_type="X",
        accelerator_count=8,
        node_count=4,
    )
    with pytest.raises(ConfigError) as caught:
        config.validate()
    message = str(caught.value)
    for field in ("accelerator_type", "accelerator_count", "node_count"):
        assert field in message


def test_managed_job_error_explains_where_the_field_belongs() -> None:
    with pytest.raises(ConfigError, match="recipe config"):
        trainer(epochs=1, max_steps=10)


def test_public_surface() -> None:
    expected = {
        "TrainerJobManager",
        "TrainerJobConfig",
        "TrainerServiceEndpoint",
        "TrainingShapeProfile",
        "CreatedTrainerJob",
        "CheckpointInfo",
        "DeploymentManager",
        "DeploymentConfig",
        "DeploymentInfo",
        "RetryPolicy",
        "FireworksSettings",
    }
    errors = {name for name in vars(sdk.errors) if name.endswith("Error")}
    assert expected | errors <= set(sdk.__all__)
    # getattr, not hasattr over all of __all__: the tinker clients load lazily and slowly.
    assert all(getattr(sdk, name) is not None for name in expected | errors)


def test_the_key_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", "fw-from-env")
    assert resolve_api_key(None) == "fw-from-env"
    monkeypatch.delenv("FIREWORKS_API_KEY")
    with pytest.raises(ConfigError, match="FIREWORKS_API_KEY"):
        TrainerJobManager(base_url=BASE_URL)
