"""Why a base model cannot be made available, as types the platform maps to clear responses.

    ValueError
     └── UnknownModelError            (registry.py) the name is not registered: a user error
    RuntimeError
     └── ModelUnavailableError        a registered model cannot be built on this machine
          ├── ModelPackageMissingError   the package that ships its weights is not installed
          └── ModelBuildTimeoutError     another builder held the build lock past the deadline

Messages say what to do (the install command, the lock file), never only what failed.
"""

from __future__ import annotations


class ModelUnavailableError(RuntimeError):
    """A registered base model cannot be built or loaded on this machine."""


class ModelPackageMissingError(ModelUnavailableError):
    """The package that ships the model's weights is not installed; the message says how to."""


class ModelBuildTimeoutError(ModelUnavailableError):
    """Another process held the model's build lock longer than the caller would wait."""
