"""Platform resources as the SDK hands them out: frozen pydantic models, parsed from wire JSON.

Each `from_api` reads the platform's camelCase control-plane JSON tolerantly (unknown fields
ignored, missing ones defaulted), so a newer server never breaks an older client.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from sdk.errors import FireworksError

__all__ = [
    "CheckpointInfo",
    "CreatedTrainerJob",
    "DeploymentInfo",
    "TrainerJob",
    "TrainerServiceEndpoint",
    "TrainingShapeProfile",
    "last_segment",
]

_RESUMABLE_CHECKPOINT_SUFFIXES = ("TRAINING", "TRAINING_LORA")


def last_segment(name: str) -> str:
    """The id at the end of a resource name (`accounts/a/rlorTrainerJobs/j` → `j`)."""
    return name.rstrip("/").rsplit("/", 1)[-1]


def _str(data: Mapping[str, Any], *keys: str) -> str | None:
    """The first non-empty string among `keys` of `data`."""
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class _Resource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def _build(cls, what: str, **fields: Any) -> Self:
        # A malformed answer is the platform's fault, reported in the SDK's tree, not pydantic's.
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise FireworksError(f"unexpected {what} from the platform: {exc}") from None


class TrainerJob(_Resource):
    """A trainer job as the control plane describes it, with the fields the SDK reads."""

    name: str
    state: str = ""
    status_message: str | None = None
    direct_route_handle: str | None = None
    max_context_length: int | None = None
    create_time: datetime | None = None

    @property
    def job_id(self) -> str:
        """The job id: the last segment of `name`."""
        return last_segment(self.name)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> TrainerJob:
        """Parse a create or get answer; the status text is the first non-empty of its spellings."""
        status = data.get("status")
        status_text = _str(data, "statusMessage", "message") or _str(
            _mapping(status), "message", "statusMessage", "detail", "details"
        )
        if status_text is None and isinstance(status, str) and status:
            status_text = status
        context = _mapping(data.get("trainingConfig")).get("maxContextLength")
        return cls._build(
            "trainer job",
            name=data.get("name") or "",
            state=data.get("state") or "",
            status_message=status_text,
            direct_route_handle=_str(data, "directRouteHandle"),
            max_context_length=context if isinstance(context, int) and context > 0 else None,
            create_time=data.get("createTime"),
        )


class CreatedTrainerJob(_Resource):
    """What `TrainerJobManager.create` returns: the job's resource name and id."""

    job_name: str
    job_id: str


class TrainerServiceEndpoint(_Resource):
    """A ready trainer: where to point a `FiretitanServiceClient`."""

    job_name: str
    job_id: str
    base_url: str
    max_context_length: int | None = None


class TrainingShapeProfile(_Resource):
    """A training shape version: the infra settings a shape pins down."""

    training_shape_version: str = ""
    trainer_image_tag: str = ""
    max_supported_context_length: int = 0
    node_count: int = 1
    deployment_shape_version: str = ""
    deployment_image_tag: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0
    base_model_weight_precision: str = ""
    pipeline_parallelism: int = 1
    trainer_mode: str = ""

    @property
    def training_shape(self) -> str:
        """The shape's name without `/versions/…`."""
        return self.training_shape_version.split("/versions/", 1)[0]

    @property
    def deployment_shape(self) -> str | None:
        """The versioned deployment shape to serve this model with, if the shape names one."""
        return self.deployment_shape_version or None

    @property
    def supports_lora(self) -> bool:
        """Whether trainers of this shape train LoRA adapters."""
        return self.trainer_mode == "LORA_TRAINER"

    @classmethod
    def from_api(cls, version: Mapping[str, Any]) -> TrainingShapeProfile:
        """Parse a training shape version (the latest validated one, or one named exactly)."""
        snapshot = _mapping(version.get("snapshot"))
        sharding = _mapping(snapshot.get("trainerShardingScheme"))
        fields = {
            "trainer_image_tag": snapshot.get("trainerImageTag"),
            "max_supported_context_length": snapshot.get("maxSupportedContextLength"),
            "node_count": snapshot.get("nodeCount"),
            "deployment_shape_version": snapshot.get("deploymentShapeVersion"),
            "deployment_image_tag": snapshot.get("deploymentImageTag"),
            "accelerator_type": snapshot.get("acceleratorType"),
            "accelerator_count": snapshot.get("acceleratorCount"),
            "base_model_weight_precision": snapshot.get("baseModelWeightPrecision"),
            "pipeline_parallelism": sharding.get("pipelineParallelism"),
            "trainer_mode": snapshot.get("trainerMode"),
        }
        # Absent or null fields keep the model's defaults ("", 0, 1).
        present = {key: value for key, value in fields.items() if value is not None}
        return cls._build(
            "training shape version", training_shape_version=version.get("name") or "", **present
        )


class CheckpointInfo(_Resource):
    """One row of a trainer job's checkpoint listing (docs/platform-contract.md, 'Checkpoints')."""

    name: str
    checkpoint_id: str
    create_time: datetime | None = None
    update_time: datetime | None = None
    checkpoint_type: str = ""
    promotable: bool = False

    @property
    def resumable(self) -> bool:
        """Whether `load_state_with_optimizer` can resume from it (a `save_state` checkpoint)."""
        return self.checkpoint_type.endswith(_RESUMABLE_CHECKPOINT_SUFFIXES)

    @classmethod
    def from_api(cls, row: Mapping[str, Any]) -> CheckpointInfo:
        """Parse one row of the checkpoint listing."""
        name = row.get("name") or ""
        return cls._build(
            "checkpoint row",
            name=name,
            checkpoint_id=last_segment(name),
            create_time=row.get("createTime"),
            update_time=row.get("updateTime"),
            checkpoint_type=row.get("checkpointType") or "",
            promotable=bool(row.get("promotable", False)),
        )


class DeploymentInfo(_Resource):
    """A deployment; `inference_model` is the `model` string of its completions requests."""

    deployment_id: str
    name: str
    state: str
    hot_load_bucket_url: str | None = None
    hot_load_trainer_job: str | None = None
    deployment_shape_version: str | None = None
    inference_model: str | None = None
    base_model: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> DeploymentInfo:
        """Parse a create, get or update answer (camelCase; snake_case fallbacks seen in use)."""
        name = data.get("name") or ""
        return cls._build(
            "deployment",
            deployment_id=last_segment(name),
            name=name,
            state=data.get("state") or "",
            hot_load_bucket_url=_str(data, "hotLoadBucketUrl"),
            hot_load_trainer_job=_str(data, "hotLoadTrainerJob", "hot_load_trainer_job"),
            deployment_shape_version=_str(data, "deploymentShape", "deployment_shape"),
            inference_model=name or None,
            base_model=_str(data, "baseModel", "base_model"),
        )
