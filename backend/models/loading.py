"""One lock around every construction of a Hugging Face model in this process.

transformers sets process-global state while it builds or loads a model (weight-init and
weight-tying switches). The platform builds models on several threads at once — a trainer's
worker, a deployment's loader, the model cache — and two constructions overlapping left a tiny
model with an untied output layer (361,984 parameters instead of 328,832) in a test run.
Holding this lock while a model is constructed or loaded makes each construction see only its
own settings; it is held for construction only, never while a model computes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_CONSTRUCTION_LOCK = threading.RLock()


@contextmanager
def model_construction() -> Iterator[None]:
    """Hold the process-wide model-construction lock for the duration of the block."""
    with _CONSTRUCTION_LOCK:
        yield
