"""The Prefect deployments of the recipe flows, declared as data: one list both ways of running
them read (`fireloop serve`, and `prefect.yaml`, generated from it, for `prefect deploy --all`).

Deployments (flow/deployment, entrypoint):

    sft/sft-nightly    flows/sft.py:sft_flow    cron 0 3 * * * (UTC), runs named sft-nightly-<date>
    rl/rl-weekly       flows/rl.py:rl_flow      cron 0 4 * * 1 (UTC), runs named rl-weekly-<date>
    dpo/dpo-on-demand  flows/dpo.py:dpo_flow    no schedule
    orpo/orpo-on-demand flows/orpo.py:orpo_flow no schedule

Every example trains the tiny model on a built-in toy task on the embedded platform in about a
minute of CPU, so each one is runnable as it stands; a real deployment overrides `config` (or
passes `--params`). Each takes one work pool, `fireloop` (type `process`).
"""

from __future__ import annotations

import importlib
from typing import Any, Final, Literal

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from flows.config import DPOConfig, ORPOConfig, RecipeConfig, RLConfig, SFTConfig

__all__ = [
    "CATALOG",
    "PREFECT_VERSION",
    "RECIPE_FLOWS",
    "WORK_POOL",
    "DeploymentSpec",
    "RecipeFlow",
    "Schedule",
    "deployment_named",
]

Recipe = Literal["sft", "dpo", "orpo", "rl"]
WORK_POOL: Final = "fireloop"
PREFECT_VERSION: Final = "3.9.1"


class RecipeFlow(BaseModel):
    """Where a recipe's flow lives: its file entrypoint (relative to the repository root, for
    `prefect.yaml`), its module and its config model."""

    model_config = ConfigDict(frozen=True)

    entrypoint: str
    config_class: type[RecipeConfig]

    @property
    def module_entrypoint(self) -> str:
        """`flows.sft:sft_flow`: importable wherever the package is installed, any directory."""
        path, name = self.entrypoint.split(":")
        return f"{path.removesuffix('.py').replace('/', '.')}:{name}"

    def load(self) -> Any:
        """The flow object (imported on demand: it pulls in the training stack)."""
        module, name = self.module_entrypoint.split(":")
        return getattr(importlib.import_module(module), name)


RECIPE_FLOWS: Final[dict[str, RecipeFlow]] = {
    "sft": RecipeFlow(entrypoint="flows/sft.py:sft_flow", config_class=SFTConfig),
    "dpo": RecipeFlow(entrypoint="flows/dpo.py:dpo_flow", config_class=DPOConfig),
    "orpo": RecipeFlow(entrypoint="flows/orpo.py:orpo_flow", config_class=ORPOConfig),
    "rl": RecipeFlow(entrypoint="flows/rl.py:rl_flow", config_class=RLConfig),
}


class Schedule(BaseModel):
    """A cron schedule; times are read in `timezone` (the run names use UTC)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: str
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid_cron(self) -> Schedule:
        CronSchedule(cron=self.cron, timezone=self.timezone)  # refuses "0 3 * *"
        return self


class DeploymentSpec(BaseModel):
    """One deployment: a recipe flow, the config it passes, when it runs and how many at once.

    `config` is the flow's `config` parameter as JSON (what the Prefect UI shows and a run may
    override): it is checked against the recipe's config model here, but kept unresolved, so a
    `run_name_template` is filled in per flow run, from its scheduled start time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    recipe: Recipe
    description: str
    config: dict[str, JsonValue]
    schedule: Schedule | None = None
    tags: tuple[str, ...] = ()
    concurrency: ConcurrencyLimitStrategy

    @model_validator(mode="after")
    def _config_is_the_recipes(self) -> DeploymentSpec:
        platform = self.config.get("platform")
        if isinstance(platform, dict) and platform.get("api_key"):
            # Parameters are stored with every run and shown in the UI.
            raise ValueError(f"{self.name}: never put an API key in a deployment's config")
        self.recipe_flow.config_class.model_validate(self.config)
        return self

    @property
    def recipe_flow(self) -> RecipeFlow:
        return RECIPE_FLOWS[self.recipe]

    @property
    def full_name(self) -> str:
        """`<flow name>/<deployment name>`, as `prefect deployment run` takes it."""
        return f"{self.recipe}/{self.name}"

    @property
    def all_tags(self) -> list[str]:
        return ["fireloop", self.recipe, *self.tags]

    @property
    def parameters(self) -> dict[str, Any]:
        return {"config": dict(self.config)}

    @property
    def concurrency_limit(self) -> ConcurrencyLimitConfig:
        """One run of a deployment at a time: two runs of one job never share its run
        directory, its trainer or its GPUs."""
        return ConcurrencyLimitConfig(limit=1, collision_strategy=self.concurrency)


# Tiny runs: the tiny model, a few steps, on the embedded platform (no `platform`).
_TINY: Final[dict[str, JsonValue]] = {"base_model": "fireloop/tiny", "eval_every": 0}

CATALOG: Final[tuple[DeploymentSpec, ...]] = (
    DeploymentSpec(
        name="sft-nightly",
        recipe="sft",
        description="Nightly SFT on the reversal task; each night's run has its own name.",
        config={
            **_TINY,
            "run_name_template": "sft-nightly-{scheduled:%Y%m%d-%H%M}",
            "dataset": "reverse",
            "max_steps": 8,
            "batch_size": 16,
            "checkpoint_every": 4,
            "eval_size": 16,
            "sample_eval": False,
            "retry_delay_s": 5,
        },
        schedule=Schedule(cron="0 3 * * *"),
        tags=("nightly",),
        # A scheduled run that finds the previous one still training is dropped rather than
        # queued: queued runs would pile up and train back to back; the next tick comes anyway.
        concurrency=ConcurrencyLimitStrategy.CANCEL_NEW,
    ),
    DeploymentSpec(
        name="rl-weekly",
        recipe="rl",
        description="Weekly GRPO on the addition task; each week's run has its own name.",
        config={
            **_TINY,
            "run_name_template": "rl-weekly-{scheduled:%Y%m%d}",
            "dataset": "addition",
            "max_steps": 4,
            "checkpoint_every": 2,
            "completions_per_prompt": 4,
            "prompt_groups_per_step": 2,
            "max_completion_tokens": 6,
            "kl_beta": 0.0,
            "eval_size": 8,
            "retry_delay_s": 5,
        },
        schedule=Schedule(cron="0 4 * * 1"),
        tags=("weekly",),
        concurrency=ConcurrencyLimitStrategy.CANCEL_NEW,
    ),
    DeploymentSpec(
        name="dpo-on-demand",
        recipe="dpo",
        description="DPO on the reversal preference pairs, run by hand (or with --params).",
        config={
            **_TINY,
            "dataset": "reverse_pairs",
            "max_steps": 6,
            "batch_size": 8,
            "max_rows": 48,
            "eval_size": 8,
            "checkpoint_every": 3,
            "retry_delay_s": 5,
        },
        # Someone asked for this run: it waits for the one before it instead of being dropped.
        concurrency=ConcurrencyLimitStrategy.ENQUEUE,
    ),
    DeploymentSpec(
        name="orpo-on-demand",
        recipe="orpo",
        description="ORPO on the reversal preference pairs, run by hand (or with --params).",
        config={
            **_TINY,
            "dataset": "reverse_pairs",
            "max_steps": 6,
            "batch_size": 8,
            "max_rows": 48,
            "eval_size": 8,
            "checkpoint_every": 3,
            "retry_delay_s": 5,
        },
        concurrency=ConcurrencyLimitStrategy.ENQUEUE,
    ),
)


def deployment_named(name: str) -> DeploymentSpec:
    """The catalog's deployment `name` (or `<flow>/<name>`); a `KeyError` lists the names."""
    for spec in CATALOG:
        if name in (spec.name, spec.full_name):
            return spec
    raise KeyError(f"no deployment {name!r}; the catalog has {[s.name for s in CATALOG]}")
