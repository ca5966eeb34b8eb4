"""Where a run's platform API key comes from: the environment or a Prefect Secret block.

Prefect stores every flow run's parameters and shows them in the UI. A `SecretStr` in them is
stored as `**********` (so a deployment built in Python loses its key), and a key written into
a deployment's YAML parameters is stored as plain text. So a run started from a deployment
refuses a key given in the config and names the two places a key belongs: the
`FIREWORKS_API_KEY` environment variable of the process that runs the flow, or a Secret block
named by `platform.api_key_secret` (a name is safe to store; the key is loaded at run start).
"""

from __future__ import annotations

from typing import Final, cast

from prefect.context import FlowRunContext
from pydantic import SecretStr

from flows.config import PlatformConfig
from sdk import ConfigError
from sdk.settings import API_KEY_ENV, FireworksSettings

__all__ = ["KEY_PLACES", "MASKED_PARAMETER", "platform_api_key"]

# What Prefect stores in place of a `SecretStr` parameter.
MASKED_PARAMETER: Final = "**********"
KEY_PLACES: Final = (
    f"set {API_KEY_ENV} in the environment of the process that runs the flow (the worker's), "
    "or save the key in a Prefect Secret block and name it in platform.api_key_secret"
)


def _deployment_run() -> bool:
    """Whether this flow run was started from a deployment (its parameters are stored)."""
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def _from_secret_block(name: str) -> SecretStr:
    """The key in the Prefect Secret block `name`, loaded from the Prefect server now."""
    from prefect.blocks.system import Secret

    try:
        # A flow's body runs in a thread without an event loop: `load` returns the block.
        block = cast("Secret[str]", Secret.load(name))
    except ValueError as exc:  # Prefect's way of saying the block does not exist
        raise ConfigError(
            f"platform.api_key_secret: no Prefect Secret block named {name!r} on this server "
            f"({type(exc).__name__}); create it with "
            f"Secret(value=...).save({name!r}) or `prefect block create secret`"
        ) from None
    value = block.get()
    if not isinstance(value, str) or not value:
        raise ConfigError(f"platform.api_key_secret: the Secret block {name!r} holds no string")
    return SecretStr(value)


def platform_api_key(platform: PlatformConfig) -> SecretStr:
    """The key for `platform`: `api_key` (direct runs only), else the Secret block named by
    `api_key_secret`, else `FIREWORKS_API_KEY`; a `ConfigError` naming the field otherwise."""
    if platform.api_key is not None:
        if platform.api_key.get_secret_value() == MASKED_PARAMETER:
            raise ConfigError(
                "platform.api_key is Prefect's mask, not a key: a key in flow parameters is "
                f"stored masked and cannot be used; {KEY_PLACES}"
            )
        if _deployment_run():
            raise ConfigError(
                "platform.api_key: refused in a run started from a deployment, whose "
                f"parameters are stored and shown in the Prefect UI; {KEY_PLACES}"
            )
        return platform.api_key
    if platform.api_key_secret is not None:
        return _from_secret_block(platform.api_key_secret)
    from_env = FireworksSettings.from_env().api_key
    if from_env is not None:
        return from_env
    raise ConfigError(f"platform.api_key: no key; {KEY_PLACES} (or leave platform empty)")
