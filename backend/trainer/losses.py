# ruff: noqa: N815  (shape-suffixed tensor names: lp_N, loss_N, the house style)
"""The built-in tinker losses as small pure functions of one datum or of a padded batch.

Each takes `lp_N` (fp32 target logprobs of the current weights, with grad), the datum's loss
inputs and a typed config, and returns the per-token loss (it sums to the datum's loss: sums,
never means, so gradients accumulate across chunks and calls) plus per-datum metrics. Every
step is elementwise or reduces the last dimension only, so the same functions take (B, T)
right-padded batches and return (B, T) losses and (B,) metrics, row b equal to datum b's. The
registry `LOSSES` adds what the protocol needs around them: config parsing with the table's
defaults, required inputs, and the loss-token mask used for normalisation.

Notation: A = advantages, q = sampler logprobs, r = exp(lp - q), m = weights (ones if absent),
sg = stop-gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from backend.trainer.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

LossInputs = Mapping[str, torch.Tensor]
_RL_INPUTS = ("logprobs", "advantages")


@dataclass(frozen=True)
class LossOutput:
    """Per-token loss `loss_N` of one datum and its extra metrics (0-dim, detached)."""

    loss_N: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        """The datum's summed loss (scalar)."""
        return self.loss_N.sum()


@dataclass(frozen=True)
class CrossEntropyConfig:
    """`cross_entropy` takes no config."""


@dataclass(frozen=True)
class ImportanceSamplingConfig:
    ratio_log_cap: float = 20.0


@dataclass(frozen=True)
class ClipConfig:
    """Absolute ratio bounds (`ppo`, `cispo`); per-token input tensors override them."""

    clip_low_threshold: float = 0.8
    clip_high_threshold: float = 1.2
    ratio_log_cap: float = 20.0


@dataclass(frozen=True)
class DroConfig:
    beta: float = 0.05


@dataclass(frozen=True)
class GspoConfig:
    clip_low_threshold: float = 0.8
    clip_high_threshold: float = 1.2
    seq_ratio_log_cap: float = 10.0


@dataclass(frozen=True)
class DapoConfig:
    """PPO with an asymmetric range; `eps_clip_c` (> 1) enables the dual clip for A < 0."""

    clip_low_threshold: float = 0.8
    clip_high_threshold: float = 1.28
    ratio_log_cap: float = 20.0
    eps_clip_c: float | None = None


def cross_entropy(
    lp_N: torch.Tensor, inputs: LossInputs, config: CrossEntropyConfig = CrossEntropyConfig()
) -> LossOutput:
    """L = Σ_t -m_t·lp_t; weights may be any real numbers (custom-loss phase 2 sends -∂C/∂lp)."""
    return LossOutput(-_weights(lp_N, inputs) * lp_N)


def importance_sampling(
    lp_N: torch.Tensor,
    inputs: LossInputs,
    config: ImportanceSamplingConfig = ImportanceSamplingConfig(),
) -> LossOutput:
    """L = Σ_t -m_t·r_t·A_t with r_t = exp(clamp(lp_t - q_t, ±ratio_log_cap))."""
    ratio_N = _ratio(lp_N, inputs, config.ratio_log_cap)
    loss_N = -_weights(lp_N, inputs) * ratio_N * inputs["advantages"]
    return LossOutput(loss_N, {"ratio_mean": _masked_mean(ratio_N, _rl_mask(inputs), 1.0)})


def ppo(lp_N: torch.Tensor, inputs: LossInputs, config: ClipConfig = ClipConfig()) -> LossOutput:
    """L = Σ_t -m_t·min(r_t·A_t, clip(r_t, lo, hi)·A_t); lo/hi are absolute ratio bounds."""
    low, high = _bounds(lp_N, inputs, config.clip_low_threshold, config.clip_high_threshold)
    ratio_N = _ratio(lp_N, inputs, config.ratio_log_cap)
    loss_N, clipped_N = _clipped_surrogate(ratio_N, inputs["advantages"], low, high)
    return _ratio_output(_weights(lp_N, inputs) * loss_N, ratio_N, clipped_N, inputs)


def cispo(lp_N: torch.Tensor, inputs: LossInputs, config: ClipConfig = ClipConfig()) -> LossOutput:
    """L = Σ_t -m_t·sg(clip(r_t, lo, hi))·lp_t·A_t: the clipped ratio only scales the gradient."""
    low, high = _bounds(lp_N, inputs, config.clip_low_threshold, config.clip_high_threshold)
    ratio_N = _ratio(lp_N, inputs, config.ratio_log_cap)
    coef_N = torch.clamp(ratio_N, low, high).detach()
    loss_N = -_weights(lp_N, inputs) * coef_N * lp_N * inputs["advantages"]
    clipped_N = (ratio_N < low) | (ratio_N > high)
    return _ratio_output(loss_N, ratio_N, clipped_N, inputs)


def dro(lp_N: torch.Tensor, inputs: LossInputs, config: DroConfig = DroConfig()) -> LossOutput:
    """L = Σ_t -m_t·(lp_t·A_t - ½·β·(lp_t - q_t)²): a quadratic pull towards the sampler."""
    delta_N = lp_N - inputs["logprobs"]
    objective_N = lp_N * inputs["advantages"] - 0.5 * config.beta * delta_N.square()
    return LossOutput(-_weights(lp_N, inputs) * objective_N)


def gspo(lp_N: torch.Tensor, inputs: LossInputs, config: GspoConfig = GspoConfig()) -> LossOutput:
    """Sequence-level PPO: s = exp(clamp(mean_{t∈M}(sg(lp_t) - q_t), ±seq_ratio_log_cap)),
    s_t = s·exp(lp_t - sg(lp_t)) (value s, gradient s·∇lp_t),
    L = Σ_t -m_t·min(s_t·A_t, clip(s_t, lo, hi)·A_t).

    M = positions with `sequence_ratio_mask` > 0 if given, else those with A_t ≠ 0 (prompt
    positions carry zero advantage); an empty M gives s = 1.
    """
    low, high = _bounds(lp_N, inputs, config.clip_low_threshold, config.clip_high_threshold)
    advantages_N = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    seq_mask_N = mask > 0 if mask is not None else advantages_N != 0
    log_ratio_N = lp_N.detach() - inputs["logprobs"]
    mean_log_ratio = _masked_mean(log_ratio_N, seq_mask_N, 0.0)
    cap = config.seq_ratio_log_cap
    # unsqueeze: one ratio per row broadcast over its tokens (also for a single datum).
    seq_log_ratio = mean_log_ratio.clamp(-cap, cap).unsqueeze(-1)
    seq_ratio_N = torch.exp(seq_log_ratio + lp_N - lp_N.detach())
    loss_N, clipped_N = _clipped_surrogate(seq_ratio_N, advantages_N, low, high)
    return _ratio_output(_weights(lp_N, inputs) * loss_N, seq_ratio_N, clipped_N, inputs)


def dapo(lp_N: torch.Tensor, inputs: LossInputs, config: DapoConfig = DapoConfig()) -> LossOutput:
    """PPO with asymmetric bounds (default 0.8 / 1.28). With `eps_clip_c` = c > 1 set, tokens
    with A_t < 0 take min(ppo_t, -c·A_t) (dual clip: bounds the loss of a very large ratio).
    """
    low, high = _bounds(lp_N, inputs, config.clip_low_threshold, config.clip_high_threshold)
    ratio_N = _ratio(lp_N, inputs, config.ratio_log_cap)
    advantages_N = inputs["advantages"]
    loss_N, clipped_N = _clipped_surrogate(ratio_N, advantages_N, low, high)
    if config.eps_clip_c is not None:
        dual_N = -config.eps_clip_c * advantages_N
        dual_active_N = (advantages_N < 0) & (dual_N < loss_N)
        loss_N = torch.where(dual_active_N, dual_N, loss_N)
        clipped_N = clipped_N | dual_active_N
    return _ratio_output(_weights(lp_N, inputs) * loss_N, ratio_N, clipped_N, inputs)


def _weights(lp_N: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    weights = inputs.get("weights")
    return weights if weights is not None else torch.ones_like(lp_N)


def _ratio(lp_N: torch.Tensor, inputs: LossInputs, log_cap: float) -> torch.Tensor:
    # The cap keeps exp finite when the sampler and trainer disagree wildly.
    return torch.exp((lp_N - inputs["logprobs"]).clamp(-log_cap, log_cap))


def _bounds(
    lp_N: torch.Tensor, inputs: LossInputs, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (lo, hi): the input tensors when present, else the config values."""
    low_N = inputs.get("clip_low_threshold")
    high_N = inputs.get("clip_high_threshold")
    return (
        torch.full_like(lp_N.detach(), low) if low_N is None else low_N,
        torch.full_like(lp_N.detach(), high) if high_N is None else high_N,
    )


def _clipped_surrogate(
    ratio_N: torch.Tensor, advantages_N: torch.Tensor, low_N: torch.Tensor, high_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(r·A, clip(r)·A) and where the clipped branch is the smaller one."""
    unclipped_N = ratio_N * advantages_N
    clipped_N = torch.clamp(ratio_N, low_N, high_N) * advantages_N
    return -torch.minimum(unclipped_N, clipped_N), clipped_N < unclipped_N


def _rl_mask(inputs: LossInputs) -> torch.Tensor:
    """Loss tokens of an RL loss: weights ≠ 0 when given, else advantages ≠ 0."""
    weights = inputs.get("weights")
    return weights != 0 if weights is not None else inputs["advantages"] != 0


def _masked_mean(values_N: torch.Tensor, mask_N: torch.Tensor, empty: float) -> torch.Tensor:
    """Mean of `values` where `mask` over the last dimension, `empty` for a row with none."""
    count = mask_N.sum(-1)
    total = (values_N.detach() * mask_N).sum(-1)
    # No host sync on the count: a GPU step never waits here.
    return torch.where(count > 0, total / count.clamp(min=1), empty)


def _ratio_output(
    loss_N: torch.Tensor, ratio_N: torch.Tensor, clipped_N: torch.Tensor, inputs: LossInputs
) -> LossOutput:
    mask_N = _rl_mask(inputs)
    metrics = {
        "clip_frac": _masked_mean(clipped_N.to(ratio_N.dtype), mask_N, 0.0),
        "ratio_mean": _masked_mean(ratio_N, mask_N, 1.0),
    }
    return LossOutput(loss_N, metrics)


ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


@dataclass(frozen=True)
class LossFn(Generic[ConfigT]):
    """A built-in loss with its protocol contract: config type (defaults), required inputs."""

    name: str
    compute: Callable[[torch.Tensor, LossInputs, ConfigT], LossOutput]
    config_type: type[ConfigT]
    required_inputs: tuple[str, ...]

    def __call__(self, lp_N: torch.Tensor, inputs: LossInputs, config: ConfigT) -> LossOutput:
        return self.compute(lp_N, inputs, config)

    def parse_config(self, raw: Mapping[str, Any] | None) -> ConfigT:
        """Build the typed config from `loss_fn_config`, filling the table's defaults."""
        raw = raw or {}
        if "output" in raw:
            raise UserError("loss_fn_config.output (embedding outputs) is not supported locally")
        known = [f.name for f in dataclasses.fields(self.config_type)]
        for key, value in raw.items():
            if key not in known:
                names = ", ".join(known) or "none"
                raise UserError(f"loss_fn_config.{key} is not a {self.name} key; known: {names}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(f"loss_fn_config.{key} must be a number, got {value!r}")
        config = self.config_type(**{key: float(value) for key, value in raw.items()})
        _check_config(config)
        return config

    def check_inputs(self, inputs: LossInputs, where: str) -> None:
        """Required inputs present and per-token clip bounds ordered; `where` names the datum."""
        for key in ("target_tokens", *self.required_inputs):
            if key not in inputs:
                raise UserError(f"{where}.loss_fn_inputs.{key} is required by loss {self.name!r}")
        low_N, high_N = inputs.get("clip_low_threshold"), inputs.get("clip_high_threshold")
        if low_N is not None and bool((low_N < 0).any()):
            raise UserError(f"{where}.loss_fn_inputs.clip_low_threshold must be >= 0")
        if low_N is not None and high_N is not None and bool((low_N > high_N).any()):
            raise UserError(
                f"{where}.loss_fn_inputs.clip_low_threshold exceeds clip_high_threshold"
            )

    def loss_token_mask(self, inputs: LossInputs) -> torch.Tensor:
        """Positions that count as loss tokens for `num_loss_tokens` normalisation."""
        if self.required_inputs:
            return _rl_mask(inputs)
        weights = inputs.get("weights")
        if weights is None:
            return torch.ones_like(inputs["target_tokens"], dtype=torch.bool)
        return weights != 0


def _check_config(config: DataclassInstance) -> None:
    values = dataclasses.asdict(config)
    for key in ("ratio_log_cap", "seq_ratio_log_cap", "beta", "clip_low_threshold"):
        if key in values and values[key] < 0:
            raise UserError(f"loss_fn_config.{key} must be >= 0, got {values[key]}")
    if "clip_low_threshold" in values and (
        values["clip_low_threshold"] > values["clip_high_threshold"]
    ):
        raise UserError("loss_fn_config.clip_low_threshold exceeds clip_high_threshold")
    if values.get("eps_clip_c") is not None and values["eps_clip_c"] <= 1:
        raise UserError(f"loss_fn_config.eps_clip_c must be > 1, got {values['eps_clip_c']}")


LOSSES: dict[str, LossFn[Any]] = {
    loss.name: loss
    for loss in (
        LossFn("cross_entropy", cross_entropy, CrossEntropyConfig, ()),
        LossFn("importance_sampling", importance_sampling, ImportanceSamplingConfig, _RL_INPUTS),
        LossFn("ppo", ppo, ClipConfig, _RL_INPUTS),
        LossFn("cispo", cispo, ClipConfig, _RL_INPUTS),
        LossFn("dro", dro, DroConfig, _RL_INPUTS),
        LossFn("gspo", gspo, GspoConfig, _RL_INPUTS),
        LossFn("dapo", dapo, DapoConfig, _RL_INPUTS),
    )
}
# Protocol names that need server-side features the local trainer keeps off.
_UNSUPPORTED = ("stable_reinforce", "custom")


def get_loss(name: str) -> LossFn[Any]:
    """The registered loss `name`, or a `UserError` naming it and the known losses."""
    loss = LOSSES.get(name)
    if loss is not None:
        return loss
    known = ", ".join(LOSSES)
    if name in _UNSUPPORTED:
        raise UserError(f"loss_fn {name!r} is not supported by the local trainer; known: {known}")
    raise UserError(f"unknown loss_fn {name!r}; known: {known}")
