"""Inference and hotload for the local platform: deployments serve what trainers save.

A deployment's replica (`runtime.py`) loads its base model, serves token-in completions with
continuous batching on its own thread (`generation.py`, `loop.py`, `relay.py`,
`completions.py`), and swaps in trainer snapshots on hotload (`hotload.py`, `weights.py`)
without ever mixing weight versions in one response. `routes.py` mounts completions and hotload.
Only the replicas import torch, so the platform starts without it.
"""

from __future__ import annotations

from backend.serving.hotload import HotloadService
from backend.serving.routes import serving_router
from backend.serving.runtime import ServingRuntime, ServingSettings

__all__ = ["HotloadService", "ServingRuntime", "ServingSettings", "serving_router"]
