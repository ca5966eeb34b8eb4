# ruff: noqa: RUF002  (the docstrings write formulas with math symbols)
"""The RL policy losses' hyperparameters with their defaults, one frozen model per loss.

The flow's config composes these; `algorithms.rl_losses` computes with them and
`algorithms.rl_builtin` maps them onto the server losses' `loss_fn_config`.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

PolicyLoss = Literal["grpo", "dapo", "gspo", "cispo", "dro", "importance_sampling", "reinforce"]


class _LossConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GRPOConfig(_LossConfig):
    """PPO-clipped surrogate: ratio kept in [1 − eps_clip, 1 + eps_clip_high]."""

    eps_clip: float = Field(default=0.2, ge=0.0, le=1.0)
    eps_clip_high: float | None = Field(default=None, ge=0.0)  # None: the same as eps_clip
    ratio_log_cap: float = Field(default=20.0, gt=0.0)

    @property
    def high(self) -> float:
        """The upper clip width ε_h."""
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


class DAPOConfig(_LossConfig):
    """Clip-higher (an asymmetric range) and, when `eps_clip_c` is set, the dual clip for A < 0."""

    eps_clip: float = Field(default=0.2, ge=0.0, le=1.0)
    eps_clip_high: float = Field(default=0.28, ge=0.0)
    eps_clip_c: float | None = Field(default=None, gt=1.0)
    ratio_log_cap: float = Field(default=20.0, gt=0.0)


class GSPOConfig(_LossConfig):
    """Sequence-level ratio clipped to [1 − clip_ratio_low, 1 + clip_ratio_high]."""

    clip_ratio_low: float = Field(default=0.2, ge=0.0, le=1.0)
    clip_ratio_high: float = Field(default=0.2, ge=0.0)
    seq_ratio_log_cap: float = Field(default=10.0, gt=0.0)


class CISPOConfig(_LossConfig):
    """The clipped, stop-gradient ratio that scales a REINFORCE gradient."""

    eps_low: float = Field(default=0.2, ge=0.0, le=1.0)
    eps_high: float = Field(default=0.28, ge=0.0)
    ratio_log_cap: float = Field(default=20.0, gt=0.0)


class DROConfig(_LossConfig):
    """Weight of the quadratic pull towards the old policy."""

    beta: float = Field(default=0.05, ge=0.0)


class ImportanceSamplingConfig(_LossConfig):
    ratio_log_cap: float = Field(default=20.0, gt=0.0)


class ReinforceConfig(_LossConfig):
    ratio_log_cap: float = Field(default=20.0, gt=0.0)


class TISConfig(_LossConfig):
    """Train/inference importance weight: cap, token or sequence level, optional icepop τ."""

    cap: float = Field(default=5.0, gt=0.0)
    level: Literal["token", "sequence"] = "token"
    icepop_threshold: float | None = Field(default=None, ge=1.0)


PolicyLossConfig = (
    GRPOConfig
    | DAPOConfig
    | GSPOConfig
    | CISPOConfig
    | DROConfig
    | ImportanceSamplingConfig
    | ReinforceConfig
)

CONFIG_TYPES: Final[dict[PolicyLoss, type[PolicyLossConfig]]] = {
    "grpo": GRPOConfig,
    "dapo": DAPOConfig,
    "gspo": GSPOConfig,
    "cispo": CISPOConfig,
    "dro": DROConfig,
    "importance_sampling": ImportanceSamplingConfig,
    "reinforce": ReinforceConfig,
}


def loss_config(policy_loss: str, config: PolicyLossConfig | None) -> PolicyLossConfig:
    """`config`, or the loss's defaults when None; refuses an unknown loss or a config of
    another loss (which would silently train with the wrong hyperparameters)."""
    if policy_loss not in CONFIG_TYPES:
        known = ", ".join(CONFIG_TYPES)
        raise ValueError(f"policy_loss {policy_loss!r} is unknown; known: {known}")
    config_type = CONFIG_TYPES[policy_loss]
    if config is None:
        default: PolicyLossConfig = config_type()
        return default
    if not isinstance(config, config_type):
        raise ValueError(
            f"policy_loss {policy_loss!r} takes a {config_type.__name__}, "
            f"got a {type(config).__name__}"
        )
    return config
