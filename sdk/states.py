"""Trainer-job and deployment states and the classes the wait loops act on (what each class
means: docs/platform-contract.md, 'Trainer job states' and 'Deployment states').

States arrive as strings; an unknown one (a newer server) is treated as transitional rather
than rejected, so the helpers take `str`, and the `Literal` types document the known values.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "BAD_DEPLOYMENT_STATES",
    "DEPLOYMENT_CREATING",
    "DEPLOYMENT_READY",
    "JOB_FAILED",
    "JOB_PENDING",
    "JOB_RUNNING",
    "RESUMABLE_JOB_STATES",
    "TOMBSTONE_JOB_STATES",
    "DeploymentState",
    "JobState",
    "is_bad_deployment",
    "is_failed",
    "is_resumable",
    "is_tombstone",
    "is_transitional",
]

JobState = Literal[
    "JOB_STATE_UNSPECIFIED",
    "JOB_STATE_CREATING",
    "JOB_STATE_RUNNING",
    "JOB_STATE_COMPLETED",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_DELETING",
    "JOB_STATE_WRITING_RESULTS",
    "JOB_STATE_VALIDATING",
    "JOB_STATE_DELETING_CLEANING_UP",
    "JOB_STATE_PENDING",
    "JOB_STATE_EXPIRED",
    "JOB_STATE_RE_QUEUEING",
    "JOB_STATE_CREATING_INPUT_DATASET",
    "JOB_STATE_IDLE",
    "JOB_STATE_CANCELLING",
    "JOB_STATE_EARLY_STOPPED",
    "JOB_STATE_PAUSED",
    # Training-SDK tombstones: the job was deleted; GET still answers.
    "JOB_STATE_DELETED",
    "JOB_STATE_ARCHIVED",
]

DeploymentState = Literal[
    "STATE_UNSPECIFIED", "CREATING", "READY", "DELETING", "FAILED", "UPDATING", "DELETED"
]

JOB_PENDING: Final = "JOB_STATE_PENDING"
JOB_RUNNING: Final = "JOB_STATE_RUNNING"
JOB_FAILED: Final = "JOB_STATE_FAILED"
TOMBSTONE_JOB_STATES: Final = frozenset({"JOB_STATE_DELETED", "JOB_STATE_ARCHIVED"})
RESUMABLE_JOB_STATES: Final = frozenset(
    {"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_PAUSED", "JOB_STATE_COMPLETED"}
)
DEPLOYMENT_READY: Final = "READY"
DEPLOYMENT_CREATING: Final = "CREATING"
BAD_DEPLOYMENT_STATES: Final = frozenset({"FAILED", "DELETED", "DELETING"})


def is_tombstone(state: str) -> bool:
    """The job was deleted: it will never run again under this id."""
    return state in TOMBSTONE_JOB_STATES


def is_failed(state: str) -> bool:
    """The job failed (preempted, crashed); fatal for a readiness wait, resumable otherwise."""
    return state == JOB_FAILED


def is_resumable(state: str) -> bool:
    """`:resume` can bring the job back: it failed, was cancelled or paused, or completed."""
    return state in RESUMABLE_JOB_STATES


def is_transitional(state: str) -> bool:
    """Neither running, resumable nor deleted: wait and look again (CREATING, PENDING, …)."""
    return state != JOB_RUNNING and not is_resumable(state) and not is_tombstone(state)


def is_bad_deployment(state: str) -> bool:
    """The deployment failed or is going away; `create_or_get` recreates it."""
    return state in BAD_DEPLOYMENT_STATES
