"""The local trainer: a PyTorch engine behind the tinker protocol.

`TrainableModel` is one training run (full-parameter, LoRA or frozen base): forward,
forward_backward with the built-in losses of `losses.LOSSES`, optim_step (AdamW), atomic
save/load of training state and sampler snapshots (`base`, `delta`, `merged_base`). Input is
plain typed Python (`Datum`, `AdamSettings`, `LoraSettings`); bad input raises `UserError`.

The names below load lazily, so the pure-Python parts of the package (errors, the sequencer)
import without torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from backend.trainer.errors import ServerError, UserError

if TYPE_CHECKING:
    from backend.trainer.datum import Datum, decode_datum, encode_tensor_data
    from backend.trainer.engine import ForwardResult, TrainableModel
    from backend.trainer.export import apply_delta
    from backend.trainer.losses import LOSSES, LossFn, LossOutput, get_loss
    from backend.trainer.settings import (
        AdamSettings,
        CheckpointType,
        GradNormalization,
        LoraSettings,
    )

_LAZY = {
    "Datum": "backend.trainer.datum",
    "decode_datum": "backend.trainer.datum",
    "encode_tensor_data": "backend.trainer.datum",
    "ForwardResult": "backend.trainer.engine",
    "TrainableModel": "backend.trainer.engine",
    "apply_delta": "backend.trainer.export",
    "LOSSES": "backend.trainer.losses",
    "LossFn": "backend.trainer.losses",
    "LossOutput": "backend.trainer.losses",
    "get_loss": "backend.trainer.losses",
    "AdamSettings": "backend.trainer.settings",
    "CheckpointType": "backend.trainer.settings",
    "GradNormalization": "backend.trainer.settings",
    "LoraSettings": "backend.trainer.settings",
}

__all__ = [
    "LOSSES",
    "AdamSettings",
    "CheckpointType",
    "Datum",
    "ForwardResult",
    "GradNormalization",
    "LoraSettings",
    "LossFn",
    "LossOutput",
    "ServerError",
    "TrainableModel",
    "UserError",
    "apply_delta",
    "decode_datum",
    "encode_tensor_data",
    "get_loss",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
