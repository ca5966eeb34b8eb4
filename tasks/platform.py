"""Where the platform is and how long to wait for it: the small models every task takes.

Tasks receive these (serializable, the key a `SecretStr` that renders masked) and build their
own short-lived SDK clients from them, so no live client crosses a task boundary except where a
task says so with `NO_CACHE` (a cached result would hand back a dead client). Every wait and
poll is a field here: tests pass small values instead of patching time.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from sdk import APIConnectionError, DeploymentManager, RetryPolicy, TrainerJobManager
from tasks.errors import PlatformUnreachableError

__all__ = ["PREFLIGHT_BUDGET_S", "PlatformEndpoint", "Waits"]

# How long the run's first call may try to reach a platform that has not answered yet; the long
# `http_retry_budget_s` is for calls after it has answered once (a blip, not a wrong URL).
PREFLIGHT_BUDGET_S: Final = 3.0


class Waits(BaseModel):
    """Deadlines and poll intervals of one run (defaults: the SDK's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    poll_interval_s: float = Field(default=5.0, gt=0, description="Between readiness polls.")
    trainer_ready_timeout_s: float = Field(
        default=900.0, gt=0, description="Until a started trainer answers."
    )
    trainer_pending_timeout_s: float = Field(default=172800.0, gt=0, description="Capacity wait.")
    reconnect_window_s: float = Field(
        default=120.0, ge=0, description="How long a reconnect outlives transitional job states."
    )
    deployment_ready_timeout_s: float = Field(
        default=600.0, gt=0, description="Until a deployment serves."
    )
    hotload_timeout_s: float = Field(default=600.0, gt=0, description="Each hotload.")
    verify_timeout_s: float = Field(default=60.0, gt=0, description="Every replica serves it.")
    step_timeout_s: float = Field(default=3600.0, gt=0, description="Each trainer result.")
    save_timeout_s: float = Field(default=2700.0, gt=0, description="save_state / load_state.")
    checkpoint_appear_timeout_s: float = Field(
        default=90.0, gt=0, description="Until a save is listed by the control plane (C3)."
    )
    sample_timeout_s: float = Field(default=600.0, gt=0, description="Each completion.")
    http_retry_budget_s: float = Field(
        default=300.0, ge=0, description="The SDK's retry budget for one control-plane call."
    )
    http_retry_base_delay_s: float = Field(
        default=1.0, ge=0, description="First back-off of the SDK's retries."
    )


class PlatformEndpoint(BaseModel):
    """A reachable platform: control-plane URL, key, and the inference and hotload hosts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str
    api_key: SecretStr
    inference_url: str | None = None
    hotload_api_url: str | None = None
    waits: Waits = Waits()

    def _retry(self) -> RetryPolicy:
        delay = self.waits.http_retry_base_delay_s
        return RetryPolicy(
            max_wait_s=self.waits.http_retry_budget_s,
            base_delay_s=delay,
            max_delay_s=max(delay, min(30.0, 30.0 * delay)),
        )

    def check_reachable(self, job_id: str) -> None:
        """The run's first control-plane call (look up its trainer job), on a short budget.

        Raises `PlatformUnreachableError` when nothing answers, and the SDK's error for an
        answer that refuses the run (`AuthenticationError` for a wrong key), in seconds.
        """
        retry = RetryPolicy(max_wait_s=PREFLIGHT_BUDGET_S, base_delay_s=0.2, max_delay_s=1.0)
        key = self.api_key.get_secret_value()
        try:
            with TrainerJobManager(key, self.base_url, retry=retry) as manager:
                manager.try_get(job_id)
        except APIConnectionError as exc:
            raise PlatformUnreachableError(self.base_url, str(exc)[:200]) from None

    def trainer_manager(self) -> TrainerJobManager:
        """A new control-plane client for trainer jobs (close it, e.g. with `with`)."""
        return TrainerJobManager(
            self.api_key.get_secret_value(), self.base_url, retry=self._retry()
        )

    def deployment_manager(self) -> DeploymentManager:
        """A new control-plane client for deployments, hotload and sampling."""
        return DeploymentManager(
            self.api_key.get_secret_value(),
            self.base_url,
            inference_url=self.inference_url,
            hotload_api_url=self.hotload_api_url,
            retry=self._retry(),
        )
