"""`TrainerJobConfig`, a service-mode trainer's settings, and its create request.

Field checks run on construction and assignment; `validate()` adds the cross-field rules of the
three launch paths (shape, auto-shape, manual). `build_create_request` turns a valid config into
the exact create query and body, so the wire format is testable without a server.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from sdk._config import ConfigModel
from sdk._ids import check_id, check_training_shape_ref
from sdk.errors import ConfigError

__all__ = [
    "MANAGED_JOB_FIELDS",
    "LaunchPath",
    "TrainerJobConfig",
    "build_create_request",
    "duration_string",
    "new_job_id",
]

LaunchPath = Literal["shape", "auto", "manual"]

# Fields of managed fine-tuning jobs (and recipe configs) that people paste into a trainer
# config; a service-mode trainer has no such setting, so accepting them silently would lie.
MANAGED_JOB_FIELDS = frozenset(
    {
        "epochs",
        "batch_size",
        "batch_size_tokens",
        "learning_rate_warmup_steps",
        "warmup_steps",
        "max_steps",
        "dataset",
        "evaluation_dataset",
        "eval_auto_carveout",
        "output_model",
        "wandb_config",
    }
)

_DURATION = re.compile(r"^-?\d+(\.\d{1,9})?s$")
MAX_INACTIVITY_TIMEOUT = timedelta(hours=3)


def new_job_id() -> str:
    """A fresh client-chosen trainer job id (the reference SDK's format)."""
    return f"training-api-service-{uuid.uuid4().hex[:8]}"


def duration_string(value: timedelta | str) -> str:
    """A protobuf duration string: `timedelta(seconds=90)` → `"90s"`, 1.5 s → `"1.5s"`."""
    if isinstance(value, str):
        return value
    seconds = Decimal(value.days * 86400 + value.seconds) + Decimal(value.microseconds) / 10**6
    text = format(seconds.normalize(), "f")
    return f"{text}s"


def _duration_seconds(value: timedelta | str) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if not _DURATION.fullmatch(value):
        raise ConfigError(f"inactivity_timeout must look like '600s' or '1.5s', got {value!r}")
    return float(value[:-1])


class TrainerJobConfig(ConfigModel):
    """Settings of a service-mode trainer job, for `TrainerJobManager.create_and_wait`.

    Mutable (`create` stores the generated job id back into `requested_job_id` so a retried
    create reuses it), but every assignment is validated.
    """

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    base_model: str = Field(min_length=1)
    lora_rank: int = Field(default=0, ge=0)
    max_context_length: int | None = Field(default=4096, gt=0)
    learning_rate: float = Field(default=1e-5, gt=0, allow_inf_nan=False)
    # Micro-batches per optimizer step: the training loop's business; never sent to the platform.
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    node_count: int = Field(default=1, ge=1)
    display_name: str | None = Field(default=None, min_length=1, max_length=63)
    hot_load_deployment_id: str | None = None
    region: str | None = None
    custom_image_tag: str | None = None
    extra_args: list[str] | None = None
    accelerator_type: str | None = None
    accelerator_count: int | None = Field(default=None, ge=1)
    skip_validations: bool = False
    forward_only: bool = False
    trainer_replica_count: int | None = Field(default=None, ge=1)
    training_shape_ref: str | None = None
    auto_select_training_shape: bool = False
    inactivity_timeout: timedelta | str | None = None
    disable_inactivity_cleanup: bool = False
    preemptible: bool = False
    purpose: str | None = None
    managed_by: str | None = None
    requested_job_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_managed_job_fields(cls, data: Any) -> Any:
        found = sorted(MANAGED_JOB_FIELDS & data.keys()) if isinstance(data, dict) else []
        if found:
            raise ConfigError(
                f"{', '.join(found)}: managed fine-tuning job fields, not trainer settings; "
                "a service-mode training loop decides these itself (set them in the recipe "
                "config, e.g. the flow's training parameters)"
            )
        return data

    @field_validator("requested_job_id", "hot_load_deployment_id")
    @classmethod
    def _dns_label(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else check_id(info.field_name, value)

    @field_validator("training_shape_ref")
    @classmethod
    def _shape_ref(cls, value: str | None) -> str | None:
        return None if value is None else check_training_shape_ref("training_shape_ref", value)

    @field_validator("inactivity_timeout")
    @classmethod
    def _inactivity_timeout(cls, value: timedelta | str | None) -> timedelta | str | None:
        if value is None:
            return None
        seconds = _duration_seconds(value)
        if not 0 <= seconds <= MAX_INACTIVITY_TIMEOUT.total_seconds():
            raise ConfigError(
                f"inactivity_timeout must be between 0s and {MAX_INACTIVITY_TIMEOUT} "
                f"(0 = the server default of 60 minutes), got {value!r}"
            )
        return value

    @property
    def launch_path(self) -> LaunchPath:
        """Which launch path `create` takes: a named shape, an auto-selected one, or manual."""
        if self.training_shape_ref is not None:
            return "shape"
        return "auto" if self.auto_select_training_shape else "manual"

    def validate(self) -> None:  # type: ignore[override]  # pydantic's deprecated classmethod
        """Check the cross-field rules; one ConfigError lists every problem found."""
        problems: list[str] = []
        if self.training_shape_ref is not None and self.auto_select_training_shape:
            problems.append(
                "training_shape_ref and auto_select_training_shape are exclusive: pick one"
            )
        if self.launch_path != "manual":
            by = (
                "training_shape_ref"
                if self.launch_path == "shape"
                else "auto_select_training_shape"
            )
            if self.accelerator_type:
                problems.append(f"accelerator_type: set by the shape; remove it when using {by}")
            if self.accelerator_count is not None:
                problems.append(f"accelerator_count: set by the shape; remove it when using {by}")
            if self.node_count != 1:
                problems.append(f"node_count: set by the shape; leave it at 1 when using {by}")
        if self.launch_path == "auto" and self.skip_validations:
            problems.append("skip_validations: has no effect with auto_select_training_shape")
        if problems:
            raise ConfigError("invalid TrainerJobConfig:\n  - " + "\n  - ".join(problems))


def _split_args(args: list[str]) -> list[str]:
    # The platform takes one token per element; "--a 1" is a common way to write two.
    return [token for arg in args for token in arg.split()]


def _training_config(config: TrainerJobConfig) -> dict[str, Any]:
    training: dict[str, Any] = {
        "baseModel": config.base_model,
        "loraRank": config.lora_rank,
        "learningRate": config.learning_rate,
    }
    if config.max_context_length is not None and config.launch_path != "shape":
        training["maxContextLength"] = config.max_context_length
    if config.custom_image_tag:
        training["customImageTag"] = config.custom_image_tag
    if config.region:
        training["region"] = config.region
    if config.launch_path == "manual":
        if config.accelerator_type:
            training["acceleratorType"] = config.accelerator_type
        if config.accelerator_count:
            training["acceleratorCount"] = config.accelerator_count
    if config.extra_args:
        training["extraArgs"] = _split_args(config.extra_args)
    return training


def _query(config: TrainerJobConfig, job_id: str) -> dict[str, str]:
    query = {"rlorTrainerJobId": job_id}
    if config.training_shape_ref is not None:
        query["trainingShape"] = config.training_shape_ref
    path = config.launch_path
    if path == "manual" or (path == "shape" and config.skip_validations):
        query["skipValidations"] = "true"
    if config.hot_load_deployment_id:
        query["deploymentId"] = config.hot_load_deployment_id
    return query


def build_create_request(
    config: TrainerJobConfig, job_id: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """The create request's query parameters and JSON body for `config`, creating `job_id`."""
    body: dict[str, Any] = {
        "serviceMode": True,
        "keepAlive": False,
        "dataset": "",
        "trainingConfig": _training_config(config),
    }
    if config.launch_path == "manual":
        body["nodeCount"] = config.node_count
    optional = {
        "trainerReplicaCount": config.trainer_replica_count,
        "displayName": config.display_name,
        "hotLoadDeploymentId": config.hot_load_deployment_id,
        "purpose": config.purpose,
        "managedBy": config.managed_by,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    flags = {
        "forwardOnly": config.forward_only,
        "preemptible": config.preemptible,
        "disableInactivityCleanup": config.disable_inactivity_cleanup,
    }
    body.update({key: True for key, enabled in flags.items() if enabled})
    if config.inactivity_timeout is not None:
        body["inactivityTimeout"] = duration_string(config.inactivity_timeout)
    return _query(config, job_id), body
