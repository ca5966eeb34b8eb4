"""The base of every user-facing config model: pydantic validation, but `ConfigError` out.

Callers catch one exception type for bad input (`sdk.errors.ConfigError`), whether it came from
a field constraint, a model validator, an assignment or `model_validate`. Messages name each
offending field and never echo input values (a value could be a secret).
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ValidationError

from sdk.errors import ConfigError

__all__ = ["ConfigModel", "config_error"]

_PYDANTIC_VALUE_ERROR_PREFIX = "Value error, "


def _problems(model: str, error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors(include_input=False, include_url=False):
        cause = item.get("ctx", {}).get("error")
        header = f"invalid {model}:"
        if isinstance(cause, ConfigError) and str(cause).startswith(header):
            # Already converted one level down (pydantic runs a custom __init__ from
            # model_validate): keep its lines rather than nesting the header.
            lines.extend(str(cause).splitlines()[1:])
            continue
        field = ".".join(str(part) for part in item["loc"])
        text = item["msg"].removeprefix(_PYDANTIC_VALUE_ERROR_PREFIX)
        lines.append(f"  - {field}: {text}" if field and field not in text else f"  - {text}")
    return lines


def config_error(model: str, error: ValidationError) -> ConfigError:
    """One ConfigError listing every problem pydantic found, each prefixed by its field."""
    return ConfigError(f"invalid {model}:\n" + "\n".join(_problems(model, error)))


class ConfigModel(BaseModel):
    """A pydantic model whose construction, validation and assignment raise `ConfigError`."""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(type(self).__name__, exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise config_error(cls.__name__, exc) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields and not name.startswith("_"):
            raise ConfigError(f"{type(self).__name__} has no field {name!r}")
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error(type(self).__name__, exc) from None
