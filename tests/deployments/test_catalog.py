"""The deployment catalog: every recipe deployed, schedules and run-name templates where runs
recur, one run of a deployment at a time, configs that validate, and the runner deployments
`fireloop serve` builds from it (no server needed to build them)."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from pydantic import ValidationError

from deployments.catalog import CATALOG, RECIPE_FLOWS, DeploymentSpec, Schedule, deployment_named
from deployments.serve import runner_deployments
from flows.config import SFTConfig


def test_every_recipe_has_a_deployment_and_the_names_are_stable() -> None:
    """H2's server tests and the docs use these names."""
    assert [spec.full_name for spec in CATALOG] == [
        "sft/sft-nightly",
        "rl/rl-weekly",
        "dpo/dpo-on-demand",
        "orpo/orpo-on-demand",
    ]
    assert {spec.recipe for spec in CATALOG} == set(RECIPE_FLOWS)
    assert deployment_named("rl/rl-weekly") is deployment_named("rl-weekly") is CATALOG[1]
    with pytest.raises(KeyError, match="sft-nightly"):
        deployment_named("sft-hourly")


@pytest.mark.parametrize("recipe", sorted(RECIPE_FLOWS))
def test_each_entrypoint_is_the_recipes_flow(recipe: str) -> None:
    flow = RECIPE_FLOWS[recipe].load()
    assert flow.name == recipe
    assert RECIPE_FLOWS[recipe].module_entrypoint == f"flows.{recipe}:{recipe}_flow"


def test_scheduled_runs_are_named_per_schedule_and_never_overlap() -> None:
    for spec in CATALOG:
        assert "run_name" not in spec.config, spec.name  # a fixed name would resume one run
        assert spec.concurrency_limit.limit == 1
        if spec.schedule is not None:
            assert spec.config["run_name_template"], spec.name
            assert spec.concurrency is ConcurrencyLimitStrategy.CANCEL_NEW
        else:
            assert spec.concurrency is ConcurrencyLimitStrategy.ENQUEUE
    scheduled = {spec.name: spec.schedule for spec in CATALOG if spec.schedule}
    assert scheduled == {
        "sft-nightly": Schedule(cron="0 3 * * *"),
        "rl-weekly": Schedule(cron="0 4 * * 1"),
    }


def test_the_examples_are_tiny_runs_on_the_embedded_platform() -> None:
    for spec in CATALOG:
        config = spec.recipe_flow.config_class.model_validate(spec.config)
        assert config.base_model == "fireloop/tiny"
        assert config.platform is None
        assert config.max_steps <= 8, spec.name


def _spec(**changes: Any) -> DeploymentSpec:
    fields = CATALOG[0].model_dump() | changes
    return DeploymentSpec.model_validate(fields)


def test_a_bad_deployment_is_refused_when_the_catalog_is_built() -> None:
    with pytest.raises(ValidationError, match="max_steps"):
        _spec(config={"max_steps": 0})
    with pytest.raises(ValidationError, match="run_name_template"):
        _spec(config={"run_name_template": "Nightly-{scheduled:%Y}"})
    with pytest.raises(ValidationError, match="never put an API key"):
        _spec(config={"platform": {"base_url": "https://example.invalid", "api_key": "k"}})
    with pytest.raises(ValidationError, match="Invalid cron"):
        _spec(schedule={"cron": "0 3 * *"})


def test_the_served_deployments_carry_the_catalog() -> None:
    served = runner_deployments(CATALOG)
    for spec, deployment in zip(CATALOG, served, strict=True):
        assert deployment.name == spec.name
        assert deployment.flow_name == spec.recipe
        # By module (Prefect writes `flows.sft.sft_flow`), not by a path under the directory
        # `fireloop serve` started in.
        assert deployment.entrypoint == spec.recipe_flow.module_entrypoint.replace(":", ".")
        assert deployment.parameters == {"config": spec.config}
        assert deployment.tags == spec.all_tags
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options is not None
        assert deployment.concurrency_options.collision_strategy == spec.concurrency
        crons = [getattr(s.schedule, "cron", None) for s in deployment.schedules or []]
        assert crons == ([spec.schedule.cron] if spec.schedule else [])
    # The config is kept unresolved: each flow run fills in its own name.
    nightly = SFTConfig.model_validate(served[0].parameters["config"])
    assert nightly.run_name.startswith("sft-nightly-")
