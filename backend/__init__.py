"""The local platform: a Fireworks-compatible training platform on one machine.

One FastAPI app on one loopback port serves the control plane, the trainer gateway, hotload and
inference. Run it in process with `LocalPlatform` or in the foreground with `serve`. The names
below are imported on first use, so `backend.models.registry` stays importable without pulling
in the server stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.platform import LocalPlatform, PlatformTimings, create_app, serve

__all__ = ["LocalPlatform", "PlatformTimings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("backend.platform"), name)
    raise AttributeError(f"module 'backend' has no attribute {name!r}")
