# ruff: noqa: RUF002, RUF003  (formulas in math symbols)
"""RL policy losses: values and gradients against plain references, TIS and KL, the builtin
mapping, and the client closure against the server loss through the local trainer.

The references are written from the formulas token by token in Python (no shared code): the
value as a loop, the gradient as its hand-derived derivative d loss / d π_t, checked against
autograd through the closure. The random inputs put ratios on both sides of every clip range
for both advantage signs; each test asserts that its region is actually hit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from tinker import types

from algorithms.rl_builtin import BUILTIN_GRAD_NORMALIZATION, builtin_datums, builtin_loss
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
)
from algorithms.rl_inputs import RLBatch, RLSample
from algorithms.rl_losses import CLIENT_GRAD_NORMALIZATION, k3_kl, rl_loss, tis_weights
from backend import LocalPlatform
from sdk import FiretitanServiceClient, FiretitanTrainingClient
from tests.trainer_support import BATCH, FAST_TIMINGS, TrainerPlatform, make_datum

LENGTHS = [9, 12, 7, 10]  # targets per sample
PROMPTS = [2, 3, 1, 4]  # leading prompt targets (mask 0)
ADVANTAGES = [1.3, -0.8, 0.6, -1.1]
NO_TIS = TISConfig(cap=1e6)  # cap far above any ratio: w = exp(π_old − π_inf)


@dataclass
class Case:
    """Per sample: leaves π (float32, as tinker makes them) and fixed float64 inputs."""

    lps: list[torch.Tensor]
    old: list[torch.Tensor]
    inf: list[torch.Tensor]
    ref: list[torch.Tensor]
    masks: list[torch.Tensor]

    def batch(self, *, old: bool = True, ref: bool = True) -> RLBatch:
        return RLBatch(
            tuple(
                RLSample(
                    mask=m,
                    sampler_logprobs=i,
                    advantage=a,
                    old_logprobs=o if old else None,
                    ref_logprobs=r if ref else None,
                )
                for m, i, a, o, r in zip(
                    self.masks, self.inf, ADVANTAGES, self.old, self.ref, strict=True
                )
            )
        )

    def leaves(self) -> list[torch.Tensor]:
        return [lp.detach().clone().requires_grad_(True) for lp in self.lps]


def _case(seed: int = 0, spread: float = 1.0) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def noise(n: int, scale: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * scale

    lps = [-(torch.rand(n, generator=gen) * 3 + 0.05) for n in LENGTHS]
    old = [lp.double() + noise(lp.numel(), spread) for lp in lps]
    inf = [o + noise(o.numel(), 0.6) for o in old]
    ref = [lp.double() + noise(lp.numel(), 0.5) for lp in lps]
    masks = [
        torch.tensor([0.0] * p + [1.0] * (n - p)) for n, p in zip(LENGTHS, PROMPTS, strict=True)
    ]
    return Case(lps, old, inf, ref, masks)


def _datums(lps: list[torch.Tensor]) -> list[types.Datum]:
    """Datums of the right lengths; the closure reads only how many targets they have."""
    return [make_datum([1] * lp.numel(), [1] * lp.numel(), [1.0] * lp.numel()) for lp in lps]


def _tis(old: float, inf: float, cap: float) -> float:
    return min(math.exp(max(-20.0, min(20.0, old - inf))), cap)


def _clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


# A reference: per token (π, π_old, π_inf, A, w) -> (loss ℓ_t, d ℓ_t / d π), mask applied later.
TokenRef = Callable[[float, float, float, float, float], tuple[float, float]]


def _ppo_ref(low: float, high: float, cap: float = 20.0) -> TokenRef:
    def ref(lp: float, old: float, inf: float, a: float, w: float) -> tuple[float, float]:
        r = math.exp(_clip(lp - old, -cap, cap))
        unclipped, clipped = -r * a, -_clip(r, low, high) * a
        if clipped > unclipped:  # the clipped branch: constant in π
            return clipped * w, 0.0
        return unclipped * w, -r * a * w

    return ref


def _dapo_ref(low: float, high: float, c: float) -> TokenRef:
    ppo = _ppo_ref(low, high)

    def ref(lp: float, old: float, inf: float, a: float, w: float) -> tuple[float, float]:
        value, grad = ppo(lp, old, inf, a, 1.0)
        if a < 0 and -c * a < value:
            return -c * a * w, 0.0
        return value * w, grad * w

    return ref


def _cispo_ref(low: float, high: float) -> TokenRef:
    def ref(lp: float, old: float, inf: float, a: float, w: float) -> tuple[float, float]:
        coef = _clip(math.exp(lp - old), low, high)
        return -coef * lp * a * w, -coef * a * w

    return ref


def _dro_ref(beta: float) -> TokenRef:
    def ref(lp: float, old: float, inf: float, a: float, w: float) -> tuple[float, float]:
        on = 1.0 if a != 0 else 0.0
        value = -(lp * a * w - 0.5 * beta * (lp - old) ** 2 * on)
        return value, -(a * w - beta * (lp - old) * on)

    return ref


def _is_ref(lp: float, old: float, inf: float, a: float, w: float) -> tuple[float, float]:
    r = math.exp(lp - old)
    return -r * a * w, -r * a * w


def _reinforce_ref(lp: float, old: float, inf: float, a: float, w: float) -> tuple[float, float]:
    r = math.exp(lp - inf)  # against the sampler, no TIS weight
    return -r * a, -r * a


def _reference(
    case: Case, token_ref: TokenRef, kl_beta: float, tis: TISConfig, *, tokens: bool = True
) -> tuple[float, list[list[float]]]:
    """(loss, d loss / d π per sample) with the token_mean (or sequence_mean) reduction."""
    total_tokens = sum(float(m.sum()) for m in case.masks)
    loss, grads = 0.0, []
    for i, lp_T in enumerate(case.lps):
        denominator = total_tokens if tokens else float(case.masks[i].sum()) * len(case.lps)
        sample_grads = []
        for t in range(lp_T.numel()):
            lp, old, inf = float(lp_T[t]), float(case.old[i][t]), float(case.inf[i][t])
            ref, m = float(case.ref[i][t]), float(case.masks[i][t])
            w = _tis(old, inf, tis.cap) if m else 1.0
            value, grad = token_ref(lp, old, inf, ADVANTAGES[i], w)
            kl = math.exp(ref - lp) - (ref - lp) - 1
            value, grad = value + kl_beta * kl, grad + kl_beta * (1 - math.exp(ref - lp))
            loss += value * m / denominator
            sample_grads.append(grad * m / denominator)
        grads.append(sample_grads)
    return loss, grads


def _run(
    policy_loss: PolicyLoss,
    config: PolicyLossConfig,
    case: Case,
    kl_beta: float = 0.0,
    tis: TISConfig = NO_TIS,
    reduction: str = "token_mean",
) -> tuple[float, list[list[float]], dict[str, float]]:
    leaves = case.leaves()
    closure = rl_loss(policy_loss, config, case.batch(), reduction, kl_beta, tis)  # type: ignore[arg-type]
    loss, metrics = closure(_datums(leaves), leaves)
    loss.backward()
    grads = [[float(g) for g in leaf.grad] for leaf in leaves]  # type: ignore[union-attr]
    return float(loss.detach()), grads, metrics


def _assert_matches(
    got: tuple[float, list[list[float]], dict[str, float]], want: tuple[float, list[list[float]]]
) -> None:
    assert got[0] == pytest.approx(want[0], rel=1e-6, abs=1e-9)
    for got_T, want_T in zip(got[1], want[1], strict=True):
        assert got_T == pytest.approx(want_T, rel=1e-6, abs=1e-9)


def _ratios(case: Case, a_sign: float) -> list[float]:
    """The response tokens' ratios exp(π − π_old) in samples whose advantage has `a_sign`."""
    return [
        math.exp(float(lp[t]) - float(old[t]))
        for lp, old, m, a in zip(case.lps, case.old, case.masks, ADVANTAGES, strict=True)
        for t in range(lp.numel())
        if m[t] and a * a_sign > 0
    ]


@pytest.mark.parametrize("a_sign", [1.0, -1.0])
def test_the_inputs_reach_both_sides_of_the_clip_range(a_sign: float) -> None:
    ratios = _ratios(_case(), a_sign)
    assert min(ratios) < 0.8 and max(ratios) > 1.28 and any(0.8 < r < 1.2 for r in ratios)


@pytest.mark.parametrize(("kl_beta", "eps_high"), [(0.0, None), (0.1, 0.28)])
def test_grpo_value_and_gradient(kl_beta: float, eps_high: float | None) -> None:
    case = _case()
    config = GRPOConfig(eps_clip=0.2, eps_clip_high=eps_high)
    got = _run("grpo", config, case, kl_beta)
    _assert_matches(got, _reference(case, _ppo_ref(0.8, 1 + (eps_high or 0.2)), kl_beta, NO_TIS))
    assert 0.1 < got[2]["train/ppo_clip_frac"] < 0.9


def test_grpo_with_the_token_tis_cap_and_sequence_mean() -> None:
    case, tis = _case(seed=3), TISConfig(cap=1.5)
    got = _run("grpo", GRPOConfig(), case, 0.05, tis, "sequence_mean")
    want = _reference(case, _ppo_ref(0.8, 1.2), 0.05, tis, tokens=False)
    _assert_matches(got, want)
    assert 0 < got[2]["train/tis/clip_frac"] < 1


def test_kl_term_has_a_gradient_that_pulls_towards_the_reference() -> None:
    pi = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -0.1], dtype=torch.float64)
    kl = k3_kl(pi, ref)
    kl.sum().backward()
    expected = [
        math.exp(r - p) - (r - p) - 1 for p, r in zip([-1.0, -2.0, -0.5], ref.tolist(), strict=True)
    ]
    assert kl.tolist() == pytest.approx(expected)
    assert kl[1] == 0 and bool((kl >= 0).all())
    # d/dπ = 1 − exp(π_ref − π): positive where π > π_ref, negative where below, 0 at equality
    assert pi.grad.tolist() == pytest.approx([1 - math.exp(-0.5), 0.0, 1 - math.exp(0.4)])  # type: ignore[union-attr]
    assert pi.grad[0] > 0 > pi.grad[2]  # type: ignore[index]


def test_dapo_clip_higher_and_dual_clip() -> None:
    case = _case()
    config = DAPOConfig(eps_clip_c=1.5)
    got = _run("dapo", config, case)
    _assert_matches(got, _reference(case, _dapo_ref(0.8, 1.28, 1.5), 0.0, NO_TIS))
    # the dual clip bites: a token with A < 0 and ratio above c
    assert max(_ratios(case, -1.0)) > 1.5
    assert got[2]["train/dapo_clip_frac"] == got[2]["train/ppo_clip_frac"] > 0
    without = _run("dapo", DAPOConfig(), case)
    _assert_matches(without, _reference(case, _ppo_ref(0.8, 1.28), 0.0, NO_TIS))
    assert without[0] > got[0]  # capping the loss of large-ratio negative tokens lowers it


def test_dapo_refuses_a_kl_term() -> None:
    with pytest.raises(ValueError, match="kl_beta must be 0 for policy_loss 'dapo'"):
        rl_loss("dapo", None, _case().batch(), kl_beta=0.01)


def test_gspo_value_is_the_sequence_ratio_and_the_gradient_is_per_token() -> None:
    case = _case(spread=0.3)
    # shift whole sequences so that some sequence ratios leave the range and some stay inside
    for old, offset in zip(case.old, [0.5, 0.0, 0.0, -0.5], strict=True):
        old -= offset
    config = GSPOConfig()
    got = _run("gspo", config, case)
    total = sum(float(m.sum()) for m in case.masks)
    loss, grads, clipped = 0.0, [], 0
    for i, lp in enumerate(case.lps):
        m = case.masks[i]
        s = sum(float(lp[t]) - float(case.old[i][t]) for t in range(lp.numel()) if m[t])
        ratio = math.exp(s / float(m.sum()))
        a = ADVANTAGES[i]
        unclipped, clip_value = -ratio * a, -_clip(ratio, 0.8, 1.2) * a
        sample_grads = []
        for t in range(lp.numel()):
            w = _tis(float(case.old[i][t]), float(case.inf[i][t]), NO_TIS.cap)
            loss += max(unclipped, clip_value) * w * float(m[t]) / total
            # d ρ_t / d π_t = ρ_t: the sequence ratio's value, the token's own gradient
            token_grad = 0.0 if clip_value > unclipped else -ratio * a * w
            sample_grads.append(token_grad * float(m[t]) / total)
        clipped += clip_value > unclipped
        grads.append(sample_grads)
    _assert_matches(got, (loss, grads))
    assert 0 < clipped < len(case.lps)  # one sequence inside the range, one outside
    assert got[2]["train/gspo_clip_frac"] > 0


def test_cispo_weight_stops_the_gradient_and_clipped_tokens_still_learn() -> None:
    case = _case()
    got = _run("cispo", CISPOConfig(), case)
    _assert_matches(got, _reference(case, _cispo_ref(0.8, 1.28), 0.0, NO_TIS))
    assert got[2]["train/cispo_clip_frac"] > 0
    assert all(
        g != 0
        for sample, m in zip(got[1], case.masks, strict=True)
        for g, on in zip(sample, m, strict=True)
        if on
    )


def test_dro_value_gradient_and_penalty() -> None:
    case = _case()
    got = _run("dro", DROConfig(beta=0.3), case, 0.02)
    _assert_matches(got, _reference(case, _dro_ref(0.3), 0.02, NO_TIS))
    assert got[2]["train/dro_quad_penalty"] > 0


def test_dro_leaves_a_zero_advantage_sample_alone() -> None:
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    sample = RLSample([0, 1, 1], [-1.0, -1.0, -1.0], 0.0, old_logprobs=[-1.0, -1.0, -1.0])
    loss, metrics = rl_loss("dro", None, RLBatch((sample,)))(_datums([lp]), [lp])
    loss.backward()
    assert float(loss.detach()) == 0 and lp.grad.tolist() == [0.0, 0.0, 0.0]  # type: ignore[union-attr]
    assert metrics["train/dro_quad_penalty"] == 0 and metrics["train/active_tokens"] == 0


def test_importance_sampling_is_unclipped() -> None:
    case = _case()
    got = _run("importance_sampling", ImportanceSamplingConfig(), case)
    _assert_matches(got, _reference(case, _is_ref, 0.0, NO_TIS))
    assert got[2]["train/ppo_clip_frac"] == 0 and got[2]["train/is_ratio_mean"] > 0


def test_reinforce_uses_the_sampler_ratio_and_no_tis() -> None:
    case = _case()
    tis = TISConfig(cap=1.1, icepop_threshold=1.2)  # would change every other loss
    got = _run("reinforce", ReinforceConfig(), case, 0.1, tis)
    _assert_matches(got, _reference(case, _reinforce_ref, 0.1, NO_TIS))


def test_without_old_logprobs_the_ratio_is_one_and_only_tis_weights_the_gradient() -> None:
    case, tis = _case(), TISConfig(cap=2.0)
    leaves = case.leaves()
    loss, metrics = rl_loss("grpo", None, case.batch(old=False), tis=tis)(_datums(leaves), leaves)
    loss.backward()
    total = sum(float(m.sum()) for m in case.masks)
    for leaf, inf, m, a in zip(leaves, case.inf, case.masks, ADVANTAGES, strict=True):
        w = [
            _tis(float(p), float(q), 2.0) if on else 1.0
            for p, q, on in zip(leaf.detach(), inf, m, strict=True)
        ]
        want = [-a * wt * float(on) / total for wt, on in zip(w, m, strict=True)]
        assert leaf.grad.tolist() == pytest.approx(want, rel=1e-6)  # type: ignore[union-attr]
    assert metrics["train/ppo_clip_frac"] == 0 and metrics["train/ppo_kl"] == 0
    assert metrics["train/ppo_ratio_mean"] == 1


def test_sequence_level_tis_weights_every_token_of_a_sample_alike() -> None:
    case, tis = _case(seed=1), TISConfig(level="sequence", cap=1.05)
    leaves = case.leaves()
    loss, metrics = rl_loss("grpo", None, case.batch(old=False), tis=tis)(_datums(leaves), leaves)
    loss.backward()
    total = sum(float(m.sum()) for m in case.masks)
    capped_tokens = 0.0
    for leaf, inf, m, a in zip(leaves, case.inf, case.masks, ADVANTAGES, strict=True):
        on = [t for t in range(leaf.numel()) if m[t]]
        mean_log = sum(float(leaf.detach()[t]) - float(inf[t]) for t in on) / len(on)
        w = min(math.exp(mean_log), 1.05)
        capped_tokens += len(on) if math.exp(mean_log) > 1.05 else 0
        want = [-a * w * float(m[t]) / total for t in range(leaf.numel())]
        assert leaf.grad.tolist() == pytest.approx(want, rel=1e-6)  # type: ignore[union-attr]
    assert 0 < capped_tokens < total
    assert metrics["train/tis/clip_frac"] == pytest.approx(capped_tokens / total)


def test_tis_caps_icepop_and_sequence_level() -> None:
    old = torch.tensor([0.0, -1.0, -1.0, -2.0, -1.0], dtype=torch.float64)
    inf = torch.tensor([0.0, -3.0, -1.1, -1.0, -50.0], dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    w = tis_weights(old, inf, mask, cap=5.0)
    # prompt 1; e^2 -> capped at 5; e^0.1; e^-1; e^49 clamped to e^20 -> capped at 5
    assert w.tolist() == pytest.approx([1.0, 5.0, math.exp(0.1), math.exp(-1.0), 5.0])
    icepop = tis_weights(old, inf, mask, cap=5.0, icepop_threshold=2.0)
    assert icepop.tolist() == pytest.approx([1.0, 0.0, math.exp(0.1), 0.0, 0.0])
    seq = tis_weights(old[:4], inf[:4], mask[:4], cap=5.0, level="sequence")
    one = math.exp((2.0 + 0.1 - 1.0) / 3)  # mean log ratio over the 3 response tokens
    assert seq.tolist() == pytest.approx([1.0, one, one, one])
    seq_pop = tis_weights(old[:4], inf[:4], mask[:4], level="sequence", icepop_threshold=1.2)
    assert seq_pop.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # e^0.367 > 1.2
    assert not w.requires_grad


def test_icepop_zeros_remove_tokens_from_the_gradient_but_not_the_denominator() -> None:
    case, tis = _case(), TISConfig(icepop_threshold=1.3)
    got = _run("grpo", GRPOConfig(), case, 0.0, tis)
    want = _reference(case, _ppo_ref(0.8, 1.2), 0.0, NO_TIS)
    total = sum(float(m.sum()) for m in case.masks)
    zeroed = 0
    for i, (got_T, want_T) in enumerate(zip(got[1], want[1], strict=True)):
        for t, (g, v) in enumerate(zip(got_T, want_T, strict=True)):
            raw = math.exp(float(case.old[i][t]) - float(case.inf[i][t]))
            if case.masks[i][t] and not 1 / 1.3 <= raw <= 1.3:
                assert g == 0
                zeroed += 1
            elif case.masks[i][t]:
                assert g == pytest.approx(v / raw * min(raw, 5.0), rel=1e-6)
    assert zeroed > 0
    assert got[2]["train/total_resp_tokens"] == total
    assert got[2]["train/active_tokens"] == total - zeroed
    assert got[2]["train/mask_ratio"] == pytest.approx((total - zeroed) / total)


def test_metrics_by_hand() -> None:
    lp = torch.tensor([-9.0, -1.0, -2.0], requires_grad=True)
    sample = RLSample(
        mask=[0, 1, 1],
        sampler_logprobs=[0.0, -1.5, -2.0],
        advantage=2.0,
        old_logprobs=[0.0, -1.0, -2.5],
        ref_logprobs=[0.0, -1.0, -1.0],
    )
    closure = rl_loss("grpo", None, RLBatch((sample,)), kl_beta=0.5, tis=TISConfig(cap=1.5))
    loss, metrics = closure(_datums([lp]), [lp])
    kl = math.exp(1.0) - 1.0 - 1.0  # token 2: exp(π_ref − π) − (π_ref − π) − 1 with π_ref − π = 1
    r2 = math.exp(0.5)  # token 2 ratio: clipped at 1.2 for A > 0
    w1 = math.exp(0.5)  # token 1 TIS: exp(-1.0 + 1.5) = 1.65 -> capped at 1.5
    adv_loss = (-1.0 * 2.0 * 1.5 + -1.2 * 2.0 * math.exp(-0.5)) / 2
    assert metrics["train/mean_adv_loss"] == pytest.approx(adv_loss)
    assert metrics["train/mean_kl_penalty"] == pytest.approx(0.5 * kl / 2)
    assert float(loss.detach()) == pytest.approx(metrics["train/mean_loss"])
    assert metrics["train/mean_kl"] == pytest.approx((0.0 - 1.0) / 2)
    assert metrics["train/ref_kl"] == pytest.approx(kl / 2)
    assert metrics["train/inference_diff"] == pytest.approx(0.5 / 2)
    assert metrics["train/inference_kld"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2)
    assert metrics["train/ppo_kl"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2)
    assert metrics["train/ppo_ratio_mean"] == pytest.approx((1.0 + r2) / 2)
    assert metrics["train/ppo_clip_frac"] == 0.5
    assert metrics["train/tis/weight_mean"] == pytest.approx((1.5 + math.exp(-0.5)) / 2)
    assert metrics["train/tis/clip_frac"] == 0.5 and w1 > 1.5
    assert metrics["train/active_tokens"] == 2 and metrics["train/total_resp_tokens"] == 2


def test_the_closure_declares_its_normalisation() -> None:
    closure = rl_loss("grpo", None, _case().batch())
    assert closure.grad_normalization == CLIENT_GRAD_NORMALIZATION == "none"
    assert BUILTIN_GRAD_NORMALIZATION == "num_loss_tokens"


def test_bad_inputs_are_named() -> None:
    case = _case()
    with pytest.raises(ValueError, match="ref_logprobs"):
        rl_loss("grpo", None, case.batch(ref=False), kl_beta=0.1)
    with pytest.raises(ValueError, match="takes a GRPOConfig, got a DAPOConfig"):
        rl_loss("grpo", DAPOConfig(), case.batch())
    with pytest.raises(ValueError, match="policy_loss 'ppo2' is unknown"):
        rl_loss("ppo2", None, case.batch())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_reduction"):
        rl_loss("grpo", None, case.batch(), "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampler_logprobs has 2 tokens, mask has 3"):
        RLSample(mask=[0, 1, 1], sampler_logprobs=[0.0, 0.0], advantage=1.0)
    with pytest.raises(ValueError, match="mask has no response token"):
        RLSample(mask=[0, 0], sampler_logprobs=[0.0, 0.0], advantage=1.0)
    with pytest.raises(ValueError, match=r"samples\[1\].old_logprobs is missing"):
        one = RLSample(mask=[1], sampler_logprobs=[0.0], advantage=1.0, old_logprobs=[0.0])
        RLBatch((one, RLSample(mask=[1], sampler_logprobs=[0.0], advantage=1.0)))
    leaves = case.leaves()
    with pytest.raises(ValueError, match="datum 0 has 8 targets, RL sample 0 has 9"):
        closure = rl_loss("grpo", None, case.batch())
        closure(_datums([leaves[0][:8], *leaves[1:]]), [leaves[0][:8], *leaves[1:]])


# -- the builtin path ----------------------------------------------------------------------------


def test_builtin_mapping_follows_the_config() -> None:
    assert builtin_loss("grpo", GRPOConfig(eps_clip=0.1, eps_clip_high=0.3), 0.0) == (
        "ppo",
        {"clip_low_threshold": 0.9, "clip_high_threshold": 1.3, "ratio_log_cap": 20.0},
    )
    name, config = builtin_loss("dapo", DAPOConfig(eps_clip_c=3.0), 0.0)
    assert name == "dapo" and config["eps_clip_c"] == 3.0
    assert config["clip_high_threshold"] == pytest.approx(1.28)
    assert "eps_clip_c" not in builtin_loss("dapo", None, 0.0)[1]
    assert builtin_loss("gspo", None, 0.0)[1]["seq_ratio_log_cap"] == 10.0
    assert builtin_loss("cispo", None, 0.0)[0] == "cispo"
    assert builtin_loss("dro", None, 0.0) == ("dro", {"beta": 0.05})
    assert builtin_loss("importance_sampling", None, 0.0) == (
        "importance_sampling",
        {"ratio_log_cap": 20.0},
    )


def test_builtin_refuses_what_it_cannot_match() -> None:
    with pytest.raises(ValueError, match="kl_beta must be 0 with loss_path='builtin'"):
        builtin_loss("grpo", None, 0.001)
    with pytest.raises(ValueError, match="'reinforce' has no builtin"):
        builtin_loss("reinforce", None, 0.0)
    case = _case()
    with pytest.raises(ValueError, match=r"samples\[0\].old_logprobs is required"):
        builtin_datums("grpo", _datums(case.lps), case.batch(old=False))
    with pytest.raises(ValueError, match="'reinforce' has no builtin"):
        builtin_datums("reinforce", _datums(case.lps), case.batch())


def test_builtin_datums_fold_tis_into_the_advantages() -> None:
    case, tis = _case(), TISConfig(cap=2.0)
    datums = builtin_datums("gspo", _datums(case.lps), case.batch(), tis)
    inputs = datums[1].loss_fn_inputs
    w = tis_weights(case.old[1], case.inf[1], case.masks[1], cap=2.0)
    m = case.masks[1]
    assert inputs["advantages"].data == pytest.approx((-0.8 * w * m).tolist(), rel=1e-6)
    assert inputs["logprobs"].data == pytest.approx((case.old[1] * m).tolist(), rel=1e-6)
    assert inputs["weights"].data == m.tolist() == inputs["sequence_ratio_mask"].data
    assert inputs["logprobs"].data[:3] == [0.0, 0.0, 0.0]  # prompt positions zero-padded


# -- through the trainer: client closure vs server loss -------------------------------------------


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


def _forward(client: FiretitanTrainingClient, datums: list[types.Datum]) -> list[torch.Tensor]:
    output = client.forward(datums, "cross_entropy").result()
    return [out["logprobs"].to_torch().reshape(-1).double() for out in output.loss_fn_outputs]


# Adam with a large eps moves each weight by about lr·g/eps, so the update follows the gradient
# itself (tinker's eps of 1e-12 would turn it into lr·sign(g), and amplify float noise around 0).
ADAM = types.AdamParams(learning_rate=0.05, eps=1.0)
BUILTIN_CASES: list[tuple[PolicyLoss, PolicyLossConfig]] = [
    ("grpo", GRPOConfig(eps_clip_high=0.28)),
    ("dapo", DAPOConfig(eps_clip_c=1.5)),
    ("gspo", GSPOConfig()),
    ("cispo", CISPOConfig()),
    ("dro", DROConfig(beta=0.2)),
    ("importance_sampling", ImportanceSamplingConfig()),
]


def test_client_closure_and_builtin_server_loss_take_the_same_step(tp: TrainerPlatform) -> None:
    """Two trainers from the same init take one step per loss, one through the client closure
    (`optim_step` with no normalisation), one through the server loss (`num_loss_tokens`): same
    loss, same gradient norm, same weights after every step."""
    datums = list(BATCH)
    masks = [torch.tensor(d.loss_fn_inputs["weights"].data) for d in datums]
    gen = torch.Generator().manual_seed(5)
    tis = TISConfig(cap=1.2)
    with (
        FiretitanServiceClient(tp.create_job("rl-client-path"), tp.api_key) as client_service,
        FiretitanServiceClient(tp.create_job("rl-builtin-path"), tp.api_key) as builtin_service,
    ):
        client_path = client_service.create_training_client("tiny", seed=3)
        builtin_path = builtin_service.create_training_client("tiny", seed=3)
        before = _forward(client_path, datums)
        for policy_loss, config in BUILTIN_CASES:
            pi = _forward(client_path, datums)
            assert all(
                torch.allclose(a, b, atol=1e-5)
                for a, b in zip(pi, _forward(builtin_path, datums), strict=True)
            )
            samples = []
            # per-sample shifts move whole sequences out of GSPO's range too
            shifts = [-0.4, 0.0, 0.0, 0.4]
            for lp, m, a, shift in zip(pi, masks, [1.0, -0.7, 0.5, -1.2], shifts, strict=True):
                # float32 values, as the server datums carry them
                old = lp + shift + (torch.rand(lp.numel(), generator=gen) - 0.5)
                inf = old + (torch.rand(lp.numel(), generator=gen) - 0.5) * 0.6
                samples.append(RLSample(m, inf, a, old_logprobs=old))
            batch = RLBatch(tuple(samples))
            closure = rl_loss(policy_loss, config, batch, tis=tis)
            client_out = client_path.forward_backward_custom(datums, closure).result()
            if policy_loss in ("grpo", "dapo", "gspo", "cispo"):
                assert client_out.metrics["train/ppo_clip_frac"] > 0, policy_loss
            client_step = client_path.optim_step(ADAM, closure.grad_normalization).result()
            name, server_config = builtin_loss(policy_loss, config, 0.0)
            server_datums = builtin_datums(policy_loss, datums, batch, tis)
            builtin_out = builtin_path.forward_backward(server_datums, name, server_config).result()  # type: ignore[arg-type]
            builtin_step = builtin_path.optim_step(ADAM, BUILTIN_GRAD_NORMALIZATION).result()
            server_mean = (
                builtin_out.metrics["loss:sum"] / builtin_out.metrics["num_loss_tokens:sum"]
            )
            assert client_out.metrics["train/mean_loss"] == pytest.approx(server_mean, abs=1e-5), (
                policy_loss
            )
            assert builtin_out.metrics["num_loss_tokens:sum"] == sum(float(m.sum()) for m in masks)
            client_norm = client_step.metrics["grad_norm:mean"]  # type: ignore[index]
            assert client_norm > 0
            builtin_norm = builtin_step.metrics["grad_norm:mean"]  # type: ignore[index]
            assert client_norm == pytest.approx(builtin_norm, rel=1e-5)
            after_client, after_builtin = (
                _forward(client_path, datums),
                _forward(builtin_path, datums),
            )
            for a, b in zip(after_client, after_builtin, strict=True):
                assert torch.allclose(a, b, atol=1e-5), (policy_loss, float((a - b).abs().max()))
        moved = max(float((a - b).abs().max()) for a, b in zip(before, after_client, strict=True))
        assert moved > 1e-2  # the steps changed the model, so equal weights mean equal updates
