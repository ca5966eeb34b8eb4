# ruff: noqa: N815, RUF002  (formulas in math symbols; shape-suffixed field names)
"""RL policy losses as client closures for `forward_backward_custom`, and their building blocks.

One small pure function per loss computes a sample's per-token loss from its current log-probs
π (with gradient) and fixed inputs (old-policy π_old, sampler π_inf, advantage A, TIS weight w,
response mask m); `rl_loss` wraps one of them, the k3 KL to a reference and the batch reduction
into the closure tinker calls. The closure returns a mean, so its `optim_step` takes no
normalisation (`CLIENT_GRAD_NORMALIZATION`). Math in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import torch
from tinker import types

from algorithms.rl_config import (
    CISPOConfig,
    DAPOConfig,
    DROConfig,
    GRPOConfig,
    GSPOConfig,
    ImportanceSamplingConfig,
    PolicyLoss,
    PolicyLossConfig,
    ReinforceConfig,
    TISConfig,
    loss_config,
)
from algorithms.rl_inputs import RLBatch, RLSample

LossReduction = Literal["token_mean", "sequence_mean"]
RLLossFn = Callable[[list[types.Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]

# The closure already divides by the step's token (or sample) count; a server-side count on top
# would divide twice, and with forward_backward_custom the server would count tokens by the
# nonzero gradient weights, which vary with the clip fraction.
CLIENT_GRAD_NORMALIZATION: Final = "none"
# Log-ratio clamp before exp: keeps a wildly off-policy token's ratio finite.
LOG_RATIO_CLAMP: Final = 20.0


# -- building blocks -------------------------------------------------------------------------------


def k3_kl(lp_T: torch.Tensor, ref_T: torch.Tensor) -> torch.Tensor:
    """KL_t = exp(π_ref − π) − (π_ref − π) − 1, per token, with gradient through π.

    Non-negative, zero where π = π_ref, an unbiased estimate of KL(π ‖ π_ref) per sampled token.
    """
    delta_T = ref_T - lp_T
    return torch.exp(delta_T) - delta_T - 1.0


def tis_weights(
    pi_old_T: torch.Tensor,
    pi_inf_T: torch.Tensor,
    mask_T: torch.Tensor,
    cap: float = 5.0,
    level: Literal["token", "sequence"] = "token",
    icepop_threshold: float | None = None,
) -> torch.Tensor:
    """The train/inference importance weight w (no gradient), 1 outside the response.

    token: w_t = min(exp(clamp(π_old,t − π_inf,t, ±20)), cap) on active tokens (m > 0.5);
    sequence: one w = min(exp(clamp(mean_t(π_old − π_inf), ±20)), cap) for all active tokens;
    icepop τ ≥ 1: a raw ratio (token's, or the sequence's) outside [1/τ, τ] gives w = 0.
    """
    active_T = mask_T > 0.5
    log_ratio_T = (pi_old_T - pi_inf_T).detach().to(torch.float64)
    if level == "sequence":
        count = active_T.sum().clamp(min=1)
        log_ratio_T = ((log_ratio_T * active_T).sum() / count).expand_as(log_ratio_T)
    elif level != "token":
        raise ValueError(f"tis.level must be 'token' or 'sequence', got {level!r}")
    raw_T = torch.exp(log_ratio_T.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weight_T = raw_T.clamp(max=cap)
    if icepop_threshold is not None:
        outside_T = (raw_T < 1.0 / icepop_threshold) | (raw_T > icepop_threshold)
        weight_T = torch.where(outside_T, torch.zeros_like(weight_T), weight_T)
    return torch.where(active_T, weight_T, torch.ones_like(weight_T))


def ratio(lp_T: torch.Tensor, base_T: torch.Tensor, log_cap: float) -> torch.Tensor:
    """ρ = exp(clamp(π − base, ±log_cap)), with gradient through π."""
    return torch.exp((lp_T - base_T).clamp(-log_cap, log_cap))


@dataclass(frozen=True, eq=False)
class TokenInputs:
    """One sample's fixed per-token inputs (no gradient), aligned to its target positions."""

    old_T: torch.Tensor  # π_old
    inf_T: torch.Tensor  # π_inf, the sampler's
    adv_T: torch.Tensor  # A broadcast over the tokens
    tis_T: torch.Tensor  # w
    mask_T: torch.Tensor  # m


@dataclass(frozen=True, eq=False)
class PolicyTerms:
    """A sample's per-token loss ℓ_t (w and m applied, no KL) and what the metrics read."""

    loss_T: torch.Tensor
    ratio_T: torch.Tensor  # the ratio the loss used (detached)
    clipped_T: torch.Tensor  # where a clip (or the dual clip) set the loss (bool)
    penalty_T: torch.Tensor | None = None  # DRO's quadratic penalty (detached)


def _clipped(
    ratio_T: torch.Tensor, adv_T: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """max(−ρA, −clip(ρ, low, high)·A) per token, and where the clipped branch won."""
    unclipped_T = -ratio_T * adv_T
    clipped_T = -ratio_T.clamp(low, high) * adv_T
    return torch.maximum(unclipped_T, clipped_T), clipped_T > unclipped_T


def _terms(
    loss_T: torch.Tensor, t: TokenInputs, ratio_T: torch.Tensor, clip_T: torch.Tensor
) -> PolicyTerms:
    return PolicyTerms(loss_T * t.tis_T * t.mask_T, ratio_T.detach(), clip_T)


# -- the losses ------------------------------------------------------------------------------------


def grpo(lp_T: torch.Tensor, t: TokenInputs, config: GRPOConfig) -> PolicyTerms:
    """ℓ_t = max(−ρA, −clip(ρ, 1 − ε, 1 + ε_h)·A)·w·m, ρ = exp(clamp(π − π_old, ±ratio_log_cap)).

    (The β·KL_t·m term is added by `rl_loss`.)
    """
    ratio_T = ratio(lp_T, t.old_T, config.ratio_log_cap)
    loss_T, clip_T = _clipped(ratio_T, t.adv_T, 1.0 - config.eps_clip, 1.0 + config.high)
    return _terms(loss_T, t, ratio_T, clip_T)


def dapo(lp_T: torch.Tensor, t: TokenInputs, config: DAPOConfig) -> PolicyTerms:
    """ℓ = max(−ρA, −clip(ρ, 1 − ε_low, 1 + ε_high)·A) (clip-higher);
    with `eps_clip_c` = c set and A < 0: ℓ = min(ℓ, −c·A) (dual clip); ℓ_t = ℓ·w·m.
    """
    ratio_T = ratio(lp_T, t.old_T, config.ratio_log_cap)
    low, high = 1.0 - config.eps_clip, 1.0 + config.eps_clip_high
    loss_T, clip_T = _clipped(ratio_T, t.adv_T, low, high)
    if config.eps_clip_c is not None:
        dual_T = -config.eps_clip_c * t.adv_T
        dual_active_T = (t.adv_T < 0) & (dual_T < loss_T)
        loss_T = torch.where(dual_active_T, dual_T, loss_T)
        clip_T = clip_T | dual_active_T
    return _terms(loss_T, t, ratio_T, clip_T)


def gspo(lp_T: torch.Tensor, t: TokenInputs, config: GSPOConfig) -> PolicyTerms:
    """s = mean_{t: m>0}(π − π_old); log ρ_t = min(π − sg(π) + sg(s), seq_ratio_log_cap);
    ℓ_t = max(−ρ_t·A, −clip(ρ_t, 1 − lo, 1 + hi)·A)·w·m.

    ρ_t's value is the sequence ratio exp(s) and its gradient is ρ_t·∇π_t (token-level).
    """
    active_T = t.mask_T > 0
    count = active_T.sum().clamp(min=1)
    seq_log_ratio = ((lp_T.detach() - t.old_T) * active_T).sum() / count
    log_ratio_T = torch.clamp(lp_T - lp_T.detach() + seq_log_ratio, max=config.seq_ratio_log_cap)
    ratio_T = torch.exp(log_ratio_T)
    low, high = 1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high
    loss_T, clip_T = _clipped(ratio_T, t.adv_T, low, high)
    return _terms(loss_T, t, ratio_T, clip_T)


def cispo(lp_T: torch.Tensor, t: TokenInputs, config: CISPOConfig) -> PolicyTerms:
    """ℓ_t = −sg(clip(ρ, 1 − ε_low, 1 + ε_high))·π·A·w·m: the clipped ratio only scales a
    REINFORCE gradient, so a clipped token still learns (unlike PPO, which zeroes it)."""
    ratio_T = ratio(lp_T, t.old_T, config.ratio_log_cap)
    low, high = 1.0 - config.eps_low, 1.0 + config.eps_high
    coef_T = ratio_T.clamp(low, high).detach()
    clip_T = (ratio_T < low) | (ratio_T > high)
    return _terms(-coef_T * lp_T * t.adv_T, t, ratio_T, clip_T)


def dro(lp_T: torch.Tensor, t: TokenInputs, config: DROConfig) -> PolicyTerms:
    """ℓ_t = −(π·A·w − ½·β·(π − π_old)²·[A ≠ 0])·m: a quadratic pull towards π_old."""
    penalty_T = 0.5 * config.beta * (lp_T - t.old_T).square() * (t.adv_T != 0)
    loss_T = -(lp_T * t.adv_T * t.tis_T - penalty_T) * t.mask_T
    ratio_T = ratio(lp_T, t.old_T, LOG_RATIO_CLAMP)
    no_clip_T = torch.zeros_like(t.mask_T, dtype=torch.bool)
    return PolicyTerms(loss_T, ratio_T.detach(), no_clip_T, penalty_T.detach())


def importance_sampling(
    lp_T: torch.Tensor, t: TokenInputs, config: ImportanceSamplingConfig
) -> PolicyTerms:
    """ℓ_t = −ρ·A·w·m, ρ = exp(clamp(π − π_old, ±ratio_log_cap)), unclipped."""
    ratio_T = ratio(lp_T, t.old_T, config.ratio_log_cap)
    return _terms(-ratio_T * t.adv_T, t, ratio_T, torch.zeros_like(t.mask_T, dtype=torch.bool))


def reinforce(lp_T: torch.Tensor, t: TokenInputs, config: ReinforceConfig) -> PolicyTerms:
    """ℓ_t = −exp(clamp(π − π_inf, ±ratio_log_cap))·A·m: the ratio is against the *sampler*
    log-probs, so it already corrects the train/inference gap and no TIS weight applies.
    (The β·KL_t·m term is added by `rl_loss`.)"""
    ratio_T = ratio(lp_T, t.inf_T, config.ratio_log_cap)
    loss_T = -ratio_T * t.adv_T * t.mask_T
    return PolicyTerms(loss_T, ratio_T.detach(), torch.zeros_like(t.mask_T, dtype=torch.bool))


PolicyLossFn = Callable[[torch.Tensor, TokenInputs, Any], PolicyTerms]
POLICY_LOSSES: Final[dict[PolicyLoss, PolicyLossFn]] = {
    "grpo": grpo,
    "dapo": dapo,
    "gspo": gspo,
    "cispo": cispo,
    "dro": dro,
    "importance_sampling": importance_sampling,
    "reinforce": reinforce,
}


# -- the closure -----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _SampleTerms:
    policy: PolicyTerms
    kl_T: torch.Tensor  # β-free k3 KL to the reference (zeros without one)
    lp_T: torch.Tensor
    inputs: TokenInputs
    raw_tis_T: torch.Tensor  # the TIS ratio before the cap, at the configured level
    ref_T: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class RLLoss:
    """The closure `forward_backward_custom` calls: `(datums, logprobs) -> (loss, metrics)`.

    Pair it with `optim_step(..., grad_normalization)`: the loss is already a mean.
    """

    policy_loss: PolicyLoss
    config: PolicyLossConfig
    batch: RLBatch
    loss_reduction: LossReduction
    kl_beta: float
    tis: TISConfig
    grad_normalization: Literal["none"] = CLIENT_GRAD_NORMALIZATION

    def __call__(
        self, data: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        samples = self.batch.samples
        if len(data) != len(samples) or len(logprobs) != len(samples):
            raise ValueError(
                f"{len(data)} datums and {len(logprobs)} log-prob tensors "
                f"for {len(samples)} RL samples"
            )
        terms = [
            self._sample(i, s, lp) for i, (s, lp) in enumerate(zip(samples, logprobs, strict=True))
        ]
        adv_loss = self._reduce([t.policy.loss_T for t in terms])
        kl_penalty = self._reduce([self.kl_beta * t.kl_T * t.inputs.mask_T for t in terms])
        loss = adv_loss + kl_penalty
        metrics = _metrics(self.policy_loss, terms, self.tis.cap, self.batch.has_ref_logprobs)
        metrics["train/mean_adv_loss"] = float(adv_loss.detach())
        metrics["train/mean_kl_penalty"] = float(kl_penalty.detach())
        metrics["train/mean_loss"] = float(loss.detach())
        return loss, metrics

    def _sample(self, index: int, sample: RLSample, logprobs: torch.Tensor) -> _SampleTerms:
        lp_T = logprobs.reshape(-1).to(torch.float64)
        if lp_T.numel() != sample.num_targets:
            raise ValueError(
                f"datum {index} has {lp_T.numel()} targets, RL sample {index} has "
                f"{sample.num_targets}"
            )
        old_T = sample.old_logprobs if sample.old_logprobs is not None else lp_T.detach()
        tis_T = tis_weights(old_T, sample.sampler_logprobs, sample.mask, **self.tis.model_dump())
        inputs = TokenInputs(old_T, sample.sampler_logprobs, sample.advantages, tis_T, sample.mask)
        policy = POLICY_LOSSES[self.policy_loss](lp_T, inputs, self.config)
        ref_T = sample.ref_logprobs
        kl_T = k3_kl(lp_T, ref_T) if ref_T is not None else torch.zeros_like(lp_T)
        raw_tis_T = tis_weights(
            old_T, sample.sampler_logprobs, sample.mask, cap=math.inf, level=self.tis.level
        )
        return _SampleTerms(policy, kl_T, lp_T, inputs, raw_tis_T, ref_T)

    def _reduce(self, per_token: Sequence[torch.Tensor]) -> torch.Tensor:
        """token_mean: Σ_i Σ_t ℓ_it / Σ_i Σ_t m_it; sequence_mean: mean_i(Σ_t ℓ_it / Σ_t m_it)."""
        samples = self.batch.samples
        if self.loss_reduction == "token_mean":
            return torch.stack([x.sum() for x in per_token]).sum() / self.batch.response_tokens
        return torch.stack(
            [x.sum() / s.mask.sum() for x, s in zip(per_token, samples, strict=True)]
        ).mean()


def rl_loss(
    policy_loss: PolicyLoss,
    config: PolicyLossConfig | None,
    batch: RLBatch,
    loss_reduction: LossReduction = "token_mean",
    kl_beta: float = 0.0,
    tis: TISConfig | None = None,
) -> RLLoss:
    """The closure for one optimizer step over `batch` (its datums, in the same order).

    loss = reduce_i,t([ℓ_t + β·KL_t·m]) with ℓ_t the policy loss's per-token loss, KL_t the k3
    KL to the reference, and the reduction over the whole step (token or sequence mean).
    DAPO has no KL term, so `kl_beta > 0` is refused for it rather than ignored.
    Samples without `old_logprobs` take π_old = sg(π) from this call's own forward, which is
    exact when the rollout batch is one minibatch (that forward runs at the old weights).
    The metrics are token means over the batch's response tokens, whatever the reduction.
    """
    checked = loss_config(policy_loss, config)
    if loss_reduction not in ("token_mean", "sequence_mean"):
        raise ValueError(
            f"loss_reduction must be 'token_mean' or 'sequence_mean', got {loss_reduction!r}"
        )
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    if kl_beta > 0 and policy_loss == "dapo":
        raise ValueError("kl_beta must be 0 for policy_loss 'dapo' (DAPO has no KL term)")
    if kl_beta > 0 and not batch.has_ref_logprobs:
        raise ValueError("kl_beta > 0 needs ref_logprobs on every RL sample")
    return RLLoss(policy_loss, checked, batch, loss_reduction, kl_beta, tis or TISConfig())


def _metrics(
    policy_loss: PolicyLoss, terms: Sequence[_SampleTerms], cap: float, has_ref: bool
) -> dict[str, float]:
    """Token-pooled means over the batch's response tokens (m > 0.5), all under `train/`."""
    mask = torch.cat([t.inputs.mask_T for t in terms]) > 0.5

    def mean(per_sample: Callable[[_SampleTerms], torch.Tensor]) -> float:
        values = torch.cat([per_sample(t).detach().to(torch.float64) for t in terms])
        return float(values[mask].mean())

    total = float(mask.sum())
    active = torch.cat([(t.inputs.adv_T * t.inputs.tis_T) != 0 for t in terms]) & mask
    out = {
        "train/inference_diff": mean(lambda t: (t.lp_T - t.inputs.inf_T).abs()),
        "train/inference_kld": mean(lambda t: k3_kl(t.lp_T, t.inputs.inf_T)),
        "train/ppo_kl": mean(lambda t: k3_kl(t.lp_T, t.inputs.old_T)),
        "train/tis/weight_mean": mean(lambda t: t.inputs.tis_T),
        "train/tis/clip_frac": mean(lambda t: t.raw_tis_T > cap),
        "train/ppo_clip_frac": mean(lambda t: t.policy.clipped_T),
        "train/ppo_ratio_mean": mean(lambda t: ratio(t.lp_T, t.inputs.old_T, LOG_RATIO_CLAMP)),
        "train/active_tokens": float(active.sum()),
        "train/total_resp_tokens": total,
        "train/mask_ratio": float(active.sum()) / total,
    }
    if has_ref:
        out["train/ref_kl"] = mean(lambda t: t.kl_T)
        out["train/mean_kl"] = mean(lambda t: t.lp_T - cast(torch.Tensor, t.ref_T))
    if policy_loss in ("dapo", "gspo", "cispo"):
        out[f"train/{policy_loss}_clip_frac"] = out["train/ppo_clip_frac"]
    if policy_loss == "dro":
        out["train/dro_quad_penalty"] = mean(lambda t: cast(torch.Tensor, t.policy.penalty_T))
    if policy_loss in ("importance_sampling", "reinforce"):
        out["train/is_ratio_mean"] = mean(lambda t: t.policy.ratio_T)
    return out
