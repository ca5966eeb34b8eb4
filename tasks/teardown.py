"""Teardown by policy: keep the trainer and deployment, scale the deployment to zero, or delete.

Only resources the run owns (ids it derived itself) are touched: a trainer job or deployment
the user handed in by id is never scaled down or deleted. The SDK's delete and scale calls are
best effort (they log and never raise), which is what a `finally` needs.
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from tasks.platform import PlatformEndpoint
from tasks.policy import SHORT_TIMEOUT_S, TASK_RETRIES, TASK_RETRY_DELAYS, retry_transient

__all__ = ["TeardownPlan", "TeardownPolicy", "teardown"]

TeardownPolicy = Literal["keep", "scale_to_zero", "delete"]


class TeardownPlan(BaseModel):
    """What to do with which resources; None ids are not the run's to touch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: TeardownPolicy
    job_id: str | None = None
    deployment_id: str | None = None


@task(
    name="teardown",
    task_run_name="teardown ({plan.policy})",
    retries=TASK_RETRIES,
    retry_delay_seconds=TASK_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    timeout_seconds=SHORT_TIMEOUT_S,
)
def teardown(endpoint: PlatformEndpoint, plan: TeardownPlan) -> None:
    """`keep`: nothing. `scale_to_zero`: the deployment to zero replicas, the trainer deleted
    (its checkpoints stay listed). `delete`: both deleted."""
    logger = get_run_logger()
    if plan.policy == "keep":
        logger.info(
            "teardown: keeping trainer %s and deployment %s", plan.job_id, plan.deployment_id
        )
        return
    if plan.deployment_id is not None:
        with endpoint.deployment_manager() as deployments:
            if plan.policy == "delete":
                deployments.delete(plan.deployment_id)
            else:
                deployments.scale_to_zero(plan.deployment_id)
    if plan.job_id is not None:
        with endpoint.trainer_manager() as trainers:
            trainers.delete(plan.job_id)
    logger.info("teardown (%s) done", plan.policy)
