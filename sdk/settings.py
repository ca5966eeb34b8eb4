"""Endpoints and credentials, resolved once: explicit argument, then environment, then default.

This is the only module in `sdk/` that reads `os.environ`; everything else takes values as
arguments. Hyperparameters live in the config models, never here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import httpx
from pydantic import ConfigDict, SecretStr, ValidationInfo, field_validator

from sdk._config import ConfigModel
from sdk.errors import ConfigError

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "HOTLOAD_API_URL_ENV",
    "INFERENCE_URL_ENV",
    "FireworksSettings",
    "normalize_url",
    "resolve_api_key",
]

DEFAULT_BASE_URL = "https://api.fireworks.ai"
API_KEY_ENV = "FIREWORKS_API_KEY"
BASE_URL_ENV = "FIREWORKS_BASE_URL"
INFERENCE_URL_ENV = "FIREWORKS_INFERENCE_URL"
HOTLOAD_API_URL_ENV = "FIREWORKS_HOTLOAD_API_URL"


def normalize_url(url: str, *, field: str) -> str:
    """`url` without trailing slashes; ConfigError naming `field` unless it is http(s)."""
    stripped = url.strip().rstrip("/")
    try:
        parsed: httpx.URL | None = httpx.URL(stripped)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{field} must be an http:// or https:// URL, got {stripped!r}")
    return stripped


def _check_api_key(key: str, *, source: str) -> str:
    # The key itself is never echoed: messages only say what is wrong with it.
    if not key.strip():
        raise ConfigError(f"api_key from {source} is empty")
    if any(ch.isspace() for ch in key):
        raise ConfigError(f"api_key from {source} contains whitespace (copy-paste error?)")
    return key


def resolve_api_key(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The explicit key, else `FIREWORKS_API_KEY`; ConfigError when neither is set."""
    if explicit is not None:
        return _check_api_key(explicit, source="the api_key argument")
    env = os.environ if environ is None else environ
    from_env = env.get(API_KEY_ENV)
    if from_env is None:
        raise ConfigError(f"api_key: pass api_key= or set {API_KEY_ENV}")
    return _check_api_key(from_env, source=API_KEY_ENV)


class FireworksSettings(ConfigModel):
    """Where the platform is and how to authenticate; `from_env()` fills it from the environment.

    `inference_url` and `hotload_api_url` default to `base_url` (one host serves all three).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key: SecretStr | None = None
    base_url: str = DEFAULT_BASE_URL
    inference_url: str | None = None
    hotload_api_url: str | None = None

    @field_validator("base_url", "inference_url", "hotload_api_url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else normalize_url(value, field=info.field_name or "url")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FireworksSettings:
        """Settings from `FIREWORKS_API_KEY`, `FIREWORKS_BASE_URL`, `FIREWORKS_INFERENCE_URL`,
        `FIREWORKS_HOTLOAD_API_URL`; unset variables keep the defaults."""
        env = os.environ if environ is None else environ
        key = env.get(API_KEY_ENV)
        return cls(
            api_key=SecretStr(key) if key else None,
            base_url=env.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
            inference_url=env.get(INFERENCE_URL_ENV) or None,
            hotload_api_url=env.get(HOTLOAD_API_URL_ENV) or None,
        )

    @property
    def resolved_inference_url(self) -> str:
        """The inference host: explicit, else the control-plane base."""
        return self.inference_url or self.base_url

    @property
    def resolved_hotload_api_url(self) -> str:
        """The hotload host: explicit, else the control-plane base."""
        return self.hotload_api_url or self.base_url
