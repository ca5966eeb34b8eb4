"""`DeploymentConfig`, an inference deployment for sampling and hotload, and its create request.

Defaults are the published SDK's documented ones (docs/platform-contract.md, 'Configuration
defaults'); `build_deployment_request` is the exact query and body of the create request, kept
apart from the manager so the wire format is testable on its own.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from sdk._config import ConfigModel
from sdk._ids import check_id
from sdk.errors import ConfigError
from sdk.resources import TrainingShapeProfile

__all__ = ["DeploymentConfig", "HotLoadBucketType", "build_deployment_request"]

HotLoadBucketType = Literal["BUCKET_TYPE_UNSPECIFIED", "FW_HOSTED", "MINIO", "S3", "NEBIUS"]

_TRAINER_JOB_NAME = re.compile(r"^accounts/[^/]+/rlorTrainerJobs/[^/]+$")
_DEFAULT_DESCRIPTION = "Fireworks training deployment"


class DeploymentConfig(ConfigModel):
    """Settings of a hotload-enabled deployment, for `DeploymentManager.create_or_get`.

    `hot_load_trainer_job` links the deployment to one trainer (PER_TRAINER hotload scope): a
    full name `accounts/<a>/rlorTrainerJobs/<job>` or a bare job id of the key's account.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment_id: str
    base_model: str = Field(min_length=1)
    description: str | None = None
    deployment_shape: str | None = None
    expected_deployment_shape: str | None = None
    region: str | None = "US_VIRGINIA_1"
    min_replica_count: int = Field(default=0, ge=0)
    max_replica_count: int = Field(default=1, ge=0)
    accelerator_type: str | None = "NVIDIA_H200_141GB"
    hot_load_bucket_type: HotLoadBucketType | None = "FW_HOSTED"
    hot_load_trainer_job: str | None = None
    enable_hot_load: bool = True
    skip_shape_validation: bool = False
    disable_speculative_decoding: bool = False
    extra_args: list[str] | None = None
    extra_values: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    for_training: bool = False

    @field_validator("deployment_id")
    @classmethod
    def _deployment_id(cls, value: str) -> str:
        return check_id("deployment_id", value)

    @field_validator("hot_load_trainer_job")
    @classmethod
    def _trainer_job(cls, value: str | None) -> str | None:
        if value is None or _TRAINER_JOB_NAME.fullmatch(value):
            return value
        if "/" in value:
            raise ConfigError(
                "hot_load_trainer_job must be accounts/<a>/rlorTrainerJobs/<job> or a job id, "
                f"got {value!r}"
            )
        return check_id("hot_load_trainer_job", value)

    @classmethod
    def from_training_profile(
        cls, *, deployment_id: str, base_model: str, profile: TrainingShapeProfile, **kwargs: Any
    ) -> DeploymentConfig:
        """A config serving on the deployment shape that `profile` pairs with its trainer."""
        shape = profile.deployment_shape
        if shape is None:
            raise ConfigError(
                f"profile: training shape {profile.training_shape or '<unnamed>'} names no "
                "deployment shape (deployment_shape_version is empty)"
            )
        return cls(
            deployment_id=deployment_id,
            base_model=base_model,
            deployment_shape=shape,
            expected_deployment_shape=shape,
            **kwargs,
        )

    def validate(self) -> None:  # type: ignore[override]  # pydantic's deprecated classmethod
        """Check the cross-field rules; one ConfigError lists every problem found."""
        problems: list[str] = []
        if self.max_replica_count < self.min_replica_count:
            problems.append(
                f"max_replica_count ({self.max_replica_count}) is below "
                f"min_replica_count ({self.min_replica_count})"
            )
        expected = self.expected_deployment_shape
        if expected is not None and self.deployment_shape != expected:
            problems.append(
                f"deployment_shape ({self.deployment_shape!r}) differs from "
                f"expected_deployment_shape ({expected!r})"
            )
        if problems:
            raise ConfigError("invalid DeploymentConfig:\n  - " + "\n  - ".join(problems))


def build_deployment_request(
    config: DeploymentConfig, account_id: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """The create request's query parameters and JSON body for `config` in `account_id`."""
    query = {"deploymentId": config.deployment_id}
    if config.skip_shape_validation:
        query["skipShapeValidation"] = "true"
    if config.disable_speculative_decoding:
        query["disableSpeculativeDecoding"] = "true"
    body: dict[str, Any] = {
        "baseModel": config.base_model,
        "description": config.description or _DEFAULT_DESCRIPTION,
        "minReplicaCount": config.min_replica_count,
        "maxReplicaCount": config.max_replica_count,
        "enableHotLoad": config.enable_hot_load,
        "forTraining": config.for_training,
    }
    if config.region:
        body["placement"] = {"region": config.region}
    if config.hot_load_bucket_type:
        body["hotLoadBucketType"] = config.hot_load_bucket_type
    if job := config.hot_load_trainer_job:
        body["hotLoadTrainerJob"] = (
            job if "/" in job else f"accounts/{account_id}/rlorTrainerJobs/{job}"
        )
    # The shape pins the hardware; sending both would be contradictory, and the shape wins.
    if config.deployment_shape:
        body["deploymentShape"] = config.deployment_shape
    elif config.accelerator_type:
        body["acceleratorType"] = config.accelerator_type
    if config.extra_args:
        body["extraArgs"] = [token for arg in config.extra_args for token in arg.split()]
    if config.extra_values:
        body["extraValues"] = dict(config.extra_values)
    if config.annotations:
        body["annotations"] = dict(config.annotations)
    return query, body
