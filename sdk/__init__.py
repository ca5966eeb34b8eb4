"""fireloop's open, wire-compatible Fireworks Training SDK: the client side of the platform.

Control plane: `TrainerJobManager` (service-mode trainers) and `DeploymentManager` (inference
deployments, hotload), their config models and result types; the loop's serving side:
`WeightSyncer` (checkpoint → hotload → verify) and `DeploymentSampler` (token-in sampling) with
its concurrency controllers; one error tree (`sdk.errors`) and one HTTP layer (`sdk._http`).
Importing `sdk` pulls in httpx and pydantic only; the tinker-based clients load on first use.
"""

from typing import TYPE_CHECKING, Any

from sdk._closing import ClosesOnExit
from sdk._http import RetryPolicy
from sdk.checkpoint_refs import qualify_snapshot_name, resolve_checkpoint_path
from sdk.concurrency import (
    AdaptiveConcurrencyController,
    ConcurrencyController,
    FixedConcurrencyController,
)
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
    DeploymentSamplerTimeoutError,
    FireworksError,
    HotloadError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    SamplingRequestError,
    ServerError,
    StaleDeploymentError,
    TrainerJobError,
    TrainerLostError,
    TrainingShapeError,
    WaitTimeoutError,
)
from sdk.firetitan_types import GradAccNormalization, GradNormMetricsMode, SaveSamplerResult
from sdk.hotload_types import HotloadAck, HotloadStatus, IncrementalSnapshotMetadata, ReplicaStatus
from sdk.resources import (
    CheckpointInfo,
    CreatedTrainerJob,
    TrainerJob,
    TrainerServiceEndpoint,
    TrainingShapeProfile,
)
from sdk.sampling import DeploymentSampler, SamplerRetryPolicy
from sdk.sampling_types import CompletionResult, SampledCompletion, ServerMetrics
from sdk.settings import FireworksSettings
from sdk.trainer import TrainerJobManager
from sdk.trainer_config import TrainerJobConfig
from sdk.weight_syncer import WeightSyncer

if TYPE_CHECKING:
    from sdk.firetitan import FiretitanServiceClient
    from sdk.firetitan_sampling import FiretitanSamplingClient
    from sdk.firetitan_training import FiretitanTrainingClient

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AdaptiveConcurrencyController",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointInfo",
    "ClosesOnExit",
    "CompletionResult",
    "ConcurrencyController",
    "ConfigError",
    "ConflictError",
    "CreatedTrainerJob",
    "DeploymentConfig",
    "DeploymentError",
    "DeploymentInfo",
    "DeploymentManager",
    "DeploymentSampler",
    "DeploymentSamplerTimeoutError",
    "FiretitanSamplingClient",
    "FiretitanServiceClient",
    "FiretitanTrainingClient",
    "FireworksError",
    "FireworksSettings",
    "FixedConcurrencyController",
    "GradAccNormalization",
    "GradNormMetricsMode",
    "HotloadAck",
    "HotloadError",
    "HotloadStatus",
    "IncrementalSnapshotMetadata",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ReplicaStatus",
    "RequestTimeoutError",
    "RetryPolicy",
    "SampledCompletion",
    "SamplerRetryPolicy",
    "SamplingRequestError",
    "SaveSamplerResult",
    "ServerError",
    "ServerMetrics",
    "StaleDeploymentError",
    "TrainerJob",
    "TrainerJobConfig",
    "TrainerJobError",
    "TrainerJobManager",
    "TrainerLostError",
    "TrainerServiceEndpoint",
    "TrainingShapeError",
    "TrainingShapeProfile",
    "WaitTimeoutError",
    "WeightSyncer",
    "qualify_snapshot_name",
    "resolve_checkpoint_path",
]

# The Firetitan (tinker) clients import tinker, which imports torch: they load on first use
# (PEP 562), so that `import sdk` stays light.
_LAZY_CLIENTS = {
    "FiretitanSamplingClient": "sdk.firetitan_sampling",
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
