"""fireloop's open, wire-compatible Fireworks Training SDK: the client side of the platform.

Control plane: `TrainerJobManager` (service-mode trainers) and `DeploymentManager` (inference
deployments), their config models and result types, one error tree (`sdk.errors`) and one HTTP
layer (`sdk._http`). Importing `sdk` pulls in httpx and pydantic only.
"""

from typing import TYPE_CHECKING, Any

from sdk._http import RetryPolicy
from sdk.checkpoint_refs import qualify_snapshot_name, resolve_checkpoint_path
from sdk.deployment import DeploymentConfig, DeploymentInfo, DeploymentManager
from sdk.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    ConflictError,
    DeploymentError,
    FireworksError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    TrainerJobError,
    TrainingShapeError,
    WaitTimeoutError,
)
from sdk.firetitan_types import GradAccNormalization, GradNormMetricsMode, SaveSamplerResult
from sdk.resources import (
    CheckpointInfo,
    CreatedTrainerJob,
    TrainerJob,
    TrainerServiceEndpoint,
    TrainingShapeProfile,
)
from sdk.settings import FireworksSettings
from sdk.trainer import TrainerJobManager
from sdk.trainer_config import TrainerJobConfig

if TYPE_CHECKING:
    from sdk.firetitan import FiretitanServiceClient
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointInfo",
    "ConfigError",
    "ConflictError",
    "CreatedTrainerJob",
    "DeploymentConfig",
    "DeploymentError",
    "DeploymentInfo",
    "DeploymentManager",
    "FiretitanServiceClient",
    "FiretitanTrainingClient",
    "FireworksError",
    "FireworksSettings",
    "GradAccNormalization",
    "GradNormMetricsMode",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "RetryPolicy",
    "SaveSamplerResult",
    "ServerError",
    "TrainerJob",
    "TrainerJobConfig",
    "TrainerJobError",
    "TrainerJobManager",
    "TrainerServiceEndpoint",
    "TrainingShapeError",
    "TrainingShapeProfile",
    "WaitTimeoutError",
    "qualify_snapshot_name",
    "resolve_checkpoint_path",
]

# The Firetitan (tinker) clients import tinker, which imports torch: they load on first use
# (PEP 562), so that `import sdk` stays light.
_LAZY_CLIENTS = {
    "FiretitanServiceClient": "sdk.firetitan",
    "FiretitanTrainingClient": "sdk.firetitan_training",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_CLIENTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip this function
    return value
