"""Client-side checks for resource ids and names, so a typo fails before any request is sent.

Ids are DNS labels (lowercase letters, digits, `-`; at most 63 characters); they become URL
path segments, so anything else would address the wrong resource or none.
"""

from __future__ import annotations

import re

from sdk.errors import ConfigError

__all__ = ["DNS_LABEL", "TRAINING_SHAPE_REF", "check_id", "check_training_shape_ref"]

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
TRAINING_SHAPE_REF = re.compile(r"^accounts/[^/]+/trainingShapes/[^/]+(/versions/[^/]+)?$")


def check_id(field: str, value: object) -> str:
    """`value` if it is a DNS-label id, else ConfigError naming `field`."""
    if not isinstance(value, str) or not DNS_LABEL.fullmatch(value):
        raise ConfigError(
            f"{field} must be a DNS label (lowercase letters, digits and '-', 1-63 characters, "
            f"starting and ending alphanumeric), got {value!r}"
        )
    return value


def check_training_shape_ref(field: str, value: object) -> str:
    """`value` if it names a training shape (optionally versioned), else ConfigError."""
    if not isinstance(value, str) or not TRAINING_SHAPE_REF.fullmatch(value):
        raise ConfigError(
            f"{field} must look like accounts/<account>/trainingShapes/<shape>"
            f"[/versions/<version>], got {value!r}"
        )
    return value
