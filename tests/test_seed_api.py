"""`sdk` exposes the public surface of the Fireworks Training SDK as its user described it
(`../shared/seed/000_71b30983499ff581.txt`): the names, methods, fields and defaults of its
tables. A rename or a changed default breaks users' code silently; this test makes it loud.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import sdk

# TrainerJobConfig reference table of the seed: field -> default (... = required).
TRAINER_JOB_CONFIG: dict[str, Any] = {
    "base_model": ...,
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
}

# DeploymentConfig reference table of the seed.
DEPLOYMENT_CONFIG: dict[str, Any] = {
    "deployment_id": ...,
    "base_model": ...,
    "deployment_shape": None,
    "region": "US_VIRGINIA_1",
    "min_replica_count": 0,
    "max_replica_count": 1,
    "accelerator_type": "NVIDIA_H200_141GB",
    "hot_load_bucket_type": "FW_HOSTED",
    "skip_shape_validation": False,
    "extra_args": None,
}

# Resource setup & teardown table of the seed.
MANAGER_METHODS = {
    "TrainerJobManager": [
        "create_and_wait",
        "wait_for_existing",
        "resume_and_wait",
        "reconnect_and_wait",
        "resolve_training_profile",
        "delete",
    ],
    "DeploymentManager": ["create_or_get", "wait_for_ready", "scale_to_zero", "delete"],
}


def _defaults(model: Any) -> dict[str, Any]:
    return {
        name: (... if field.is_required() else field.get_default(call_default_factory=True))
        for name, field in model.model_fields.items()
    }


@pytest.mark.parametrize(
    ("config_name", "table"),
    [("TrainerJobConfig", TRAINER_JOB_CONFIG), ("DeploymentConfig", DEPLOYMENT_CONFIG)],
)
def test_config_fields_and_defaults_match_the_seed(config_name: str, table: dict[str, Any]) -> None:
    defaults = _defaults(getattr(sdk, config_name))
    missing = sorted(set(table) - set(defaults))
    assert not missing, f"{config_name} lacks seed fields {missing}"
    wrong = {k: (defaults[k], v) for k, v in table.items() if defaults[k] != v}
    assert not wrong, f"{config_name} defaults differ from the seed (have, want): {wrong}"


@pytest.mark.parametrize("manager", sorted(MANAGER_METHODS))
def test_managers_have_the_seed_methods(manager: str) -> None:
    cls = getattr(sdk, manager)
    for method in MANAGER_METHODS[manager]:
        assert callable(getattr(cls, method, None)), f"{manager}.{method} is missing"
    # The seed constructs both managers from an API key and a base URL.
    params = inspect.signature(cls.__init__).parameters
    assert {"api_key", "base_url"} <= set(params)


def test_deployment_manager_takes_separate_inference_and_hotload_urls() -> None:
    params = inspect.signature(sdk.DeploymentManager.__init__).parameters
    assert {"inference_url", "hotload_api_url"} <= set(params)


def test_every_exported_name_resolves() -> None:
    assert len(set(sdk.__all__)) == len(sdk.__all__), "duplicate names in sdk.__all__"
    unresolved = [name for name in sdk.__all__ if getattr(sdk, name, None) is None]
    assert not unresolved
