"""`sdk` exposes the public surface of the Fireworks Training SDK as its user described it: the
names, methods, fields and defaults of its API tables. A rename or a changed default breaks
users' code silently; this test makes it loud.
"""

from __future__ import annotations

import inspect

import pytest

import sdk

# The configs' fields and defaults are checked against the seed in tests/sdk/test_configs.py.

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
