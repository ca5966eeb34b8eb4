"""The built-in losses against independent references written token by token from the tinker
loss formulas (sums over tokens and datums, fp32 log-softmax), plus hand-computed values,
clipping and the registry's user errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from backend.trainer.errors import UserError
from backend.trainer.losses import (
    LOSSES,
    ClipConfig,
    DapoConfig,
    GspoConfig,
    LossOutput,
    cross_entropy,
    get_loss,
    ppo,
)

Inputs = dict[str, torch.Tensor]
# log r = lp - q per token: spans both clip regions and the unclipped middle.
LOG_RATIOS = [math.log(0.5), math.log(0.9), 0.0, math.log(1.1), math.log(1.5), math.log(3.0)]
ADVANTAGES = [1.0, -1.0, 0.5, 0.0, -2.0, 1.5]
WEIGHTS = [1.0, 1.0, 0.0, 1.0, 0.5, 1.0]


def make_inputs(*, weights: bool = True) -> tuple[torch.Tensor, Inputs]:
    lp_N = torch.tensor([-0.7, -1.3, -2.1, -0.4, -1.9, -0.2], requires_grad=True)
    inputs = {
        "target_tokens": torch.arange(6),
        "logprobs": lp_N.detach() - torch.tensor(LOG_RATIOS),
        "advantages": torch.tensor(ADVANTAGES),
    }
    if weights:
        inputs["weights"] = torch.tensor(WEIGHTS)
    return lp_N, inputs


def value_and_grad(loss: torch.Tensor, lp_N: torch.Tensor) -> tuple[float, torch.Tensor]:
    (grad_N,) = torch.autograd.grad(loss, lp_N)
    return float(loss.detach()), grad_N


# --- references: scalar autograd, one token at a time, no helpers shared with the code -------


def ref_ppo_token(lp: torch.Tensor, q: float, a: float, lo: float, hi: float) -> torch.Tensor:
    r = torch.exp(lp - q)
    unclipped = r * a
    clipped = torch.clamp(r, lo, hi) * a
    return -(unclipped if float(unclipped.detach()) <= float(clipped.detach()) else clipped)


def ref_importance_sampling(lp_N: torch.Tensor, inp: Inputs, cfg: dict[str, float]) -> torch.Tensor:
    terms = [
        -float(inp["weights"][t]) * torch.exp(lp_N[t] - inp["logprobs"][t]) * inp["advantages"][t]
        for t in range(len(lp_N))
    ]
    return torch.stack(terms).sum()


def ref_ppo(lp_N: torch.Tensor, inp: Inputs, cfg: dict[str, float]) -> torch.Tensor:
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    terms = [
        float(inp["weights"][t])
        * ref_ppo_token(lp_N[t], float(inp["logprobs"][t]), float(inp["advantages"][t]), lo, hi)
        for t in range(len(lp_N))
    ]
    return torch.stack(terms).sum()


def ref_cispo(lp_N: torch.Tensor, inp: Inputs, cfg: dict[str, float]) -> torch.Tensor:
    terms = []
    for t in range(len(lp_N)):
        r = math.exp(
            float(lp_N[t].detach()) - float(inp["logprobs"][t])
        )  # a constant: stop-gradient
        coef = min(max(r, 0.8), 1.2)
        a, m = float(inp["advantages"][t]), float(inp["weights"][t])
        terms.append(-m * coef * lp_N[t] * a)
    return torch.stack(terms).sum()


def ref_dro(lp_N: torch.Tensor, inp: Inputs, cfg: dict[str, float]) -> torch.Tensor:
    beta = cfg["beta"]
    terms = []
    for t in range(len(lp_N)):
        q, a, m = (float(inp[k][t]) for k in ("logprobs", "advantages", "weights"))
        terms.append(-m * (lp_N[t] * a - 0.5 * beta * (lp_N[t] - q) ** 2))
    return torch.stack(terms).sum()


def ref_gspo(lp_N: torch.Tensor, inp: Inputs, cfg: dict[str, float]) -> torch.Tensor:
    n = len(lp_N)
    in_m = [float(inp["advantages"][t]) != 0 for t in range(n)]
    logs = [float(lp_N[t].detach()) - float(inp["logprobs"][t]) for t in range(n) if in_m[t]]
    s = math.exp(max(min(sum(logs) / len(logs), 10.0), -10.0))
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    terms = []
    for t in range(n):
        s_t = s * torch.exp(lp_N[t] - float(lp_N[t].detach()))  # value s, gradient s * d lp_t
        a, m = float(inp["advantages"][t]), float(inp["weights"][t])
        unclipped, clipped = s_t * a, torch.clamp(s_t, lo, hi) * a
        terms.append(
            -m * (unclipped if float(unclipped.detach()) <= float(clipped.detach()) else clipped)
        )
    return torch.stack(terms).sum()


def ref_dapo(lp_N: torch.Tensor, inp: Inputs, cfg: dict[str, float]) -> torch.Tensor:
    c = cfg["eps_clip_c"]
    terms = []
    for t in range(len(lp_N)):
        q, a, m = (float(inp[k][t]) for k in ("logprobs", "advantages", "weights"))
        token = ref_ppo_token(lp_N[t], q, a, 0.8, 1.28)
        if a < 0 and -c * a < float(token.detach()):
            token = torch.tensor(-c * a)  # the dual clip: a constant, no gradient
        terms.append(m * token)
    return torch.stack(terms).sum()


REFERENCES: list[tuple[str, dict[str, float], Callable[..., torch.Tensor]]] = [
    ("importance_sampling", {}, ref_importance_sampling),
    ("ppo", {}, ref_ppo),
    ("ppo", {"clip_low_threshold": 0.6, "clip_high_threshold": 2.0}, ref_ppo),
    ("cispo", {}, ref_cispo),
    ("dro", {"beta": 0.3}, ref_dro),
    ("gspo", {}, ref_gspo),
    # s ≈ 0.905 here: a narrow range clips it for the negative advantages.
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}, ref_gspo),
    ("dapo", {"eps_clip_c": 3.0}, ref_dapo),
]


@pytest.mark.parametrize(("name", "config", "reference"), REFERENCES)
def test_loss_and_gradient_match_the_formula(
    name: str, config: dict[str, float], reference: Callable[..., torch.Tensor]
) -> None:
    lp_N, inputs = make_inputs()
    loss_fn = get_loss(name)
    out = loss_fn(lp_N, inputs, loss_fn.parse_config(config))
    value, grad_N = value_and_grad(out.loss, lp_N)
    ref_value, ref_grad_N = value_and_grad(reference(lp_N, inputs, config), lp_N)
    assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_N, ref_grad_N, rtol=1e-5, atol=1e-6)
    assert out.loss_N.shape == lp_N.shape


def test_cross_entropy_hand_computed_with_negative_weights() -> None:
    lp_N = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = cross_entropy(
        lp_N, {"target_tokens": torch.tensor([3, 4]), "weights": torch.tensor([2.0, -0.5])}
    )
    value, grad_N = value_and_grad(out.loss, lp_N)
    # -(2 * -1) - (-0.5 * -2) = 2 - 1
    assert value == pytest.approx(1.0)
    torch.testing.assert_close(grad_N, torch.tensor([-2.0, 0.5]))


def test_cross_entropy_without_weights_sums_all_tokens() -> None:
    lp_N = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    out = cross_entropy(lp_N, {"target_tokens": torch.tensor([1, 2, 3])})
    assert float(out.loss.detach()) == pytest.approx(3.5)


def test_ppo_hand_computed_clip() -> None:
    # r = 1.5 with A = 1 is clipped to 1.2 (no gradient); r = 0.5 with A = 1 stays (grad -r·A).
    lp_N = torch.tensor([-1.0, -1.0], requires_grad=True)
    inputs = {
        "target_tokens": torch.tensor([0, 0]),
        "logprobs": torch.tensor([-1.0 - math.log(1.5), -1.0 - math.log(0.5)]),
        "advantages": torch.tensor([1.0, 1.0]),
    }
    out = ppo(lp_N, inputs)
    value, grad_N = value_and_grad(out.loss, lp_N)
    assert value == pytest.approx(-1.2 - 0.5, rel=1e-6)
    torch.testing.assert_close(grad_N, torch.tensor([0.0, -0.5]))
    assert float(out.metrics["clip_frac"]) == pytest.approx(0.5)
    assert float(out.metrics["ratio_mean"]) == pytest.approx(1.0)


def test_per_token_clip_thresholds_override_the_config() -> None:
    lp_N, inputs = make_inputs()
    inputs["clip_low_threshold"] = torch.full((6,), 0.1)
    inputs["clip_high_threshold"] = torch.full((6,), 10.0)
    wide = ClipConfig(clip_low_threshold=0.1, clip_high_threshold=10.0)
    overridden = ppo(lp_N, inputs, ClipConfig())
    configured = ppo(lp_N, {k: v for k, v in inputs.items() if "clip" not in k}, wide)
    assert float(overridden.loss.detach()) == pytest.approx(float(configured.loss.detach()))
    assert float(overridden.metrics["clip_frac"]) == 0.0


def test_dapo_dual_clip_bounds_negative_advantage_loss() -> None:
    lp_N = torch.tensor([0.0], requires_grad=True)
    inputs = {
        "target_tokens": torch.tensor([0]),
        "logprobs": torch.tensor([-math.log(5.0)]),  # r = 5
        "advantages": torch.tensor([-1.0]),
    }
    plain = get_loss("dapo")(lp_N, inputs, DapoConfig())
    dual = get_loss("dapo")(lp_N, inputs, DapoConfig(eps_clip_c=3.0))
    assert float(plain.loss.detach()) == pytest.approx(5.0, rel=1e-6)  # -r·A, unclipped for A < 0
    value, grad_N = value_and_grad(dual.loss, lp_N)
    assert value == pytest.approx(3.0)  # -c·A
    assert float(grad_N[0]) == 0.0
    assert float(dual.metrics["clip_frac"]) == 1.0


def test_gspo_sequence_ratio_mask_selects_the_mean() -> None:
    lp_N, inputs = make_inputs()
    inputs["sequence_ratio_mask"] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    out = get_loss("gspo")(lp_N, inputs, GspoConfig())
    # M = {0}: s = r_0 = 0.5, the same sequence ratio on every token.
    assert float(out.metrics["ratio_mean"]) == pytest.approx(0.5, rel=1e-6)


def test_ratio_log_cap_limits_the_ratio() -> None:
    lp_N = torch.tensor([0.0], requires_grad=True)
    inputs = {
        "target_tokens": torch.tensor([0]),
        "logprobs": torch.tensor([-50.0]),
        "advantages": torch.tensor([1.0]),
    }
    loss_fn = get_loss("importance_sampling")
    out = loss_fn(lp_N, inputs, loss_fn.parse_config({"ratio_log_cap": 2.0}))
    assert float(out.loss.detach()) == pytest.approx(-math.exp(2.0), rel=1e-6)


def test_registry_has_every_builtin() -> None:
    assert set(LOSSES) == {
        "cross_entropy",
        "importance_sampling",
        "ppo",
        "cispo",
        "dro",
        "gspo",
        "dapo",
    }


@pytest.mark.parametrize("name", ["nope", "stable_reinforce", "custom"])
def test_unknown_or_unsupported_loss_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match=rf"'{name}'.*known: cross_entropy, importance_sampling"):
        get_loss(name)


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("ppo", {"clip_low": 0.5}, "loss_fn_config.clip_low is not a ppo key"),
        ("ppo", {"clip_low_threshold": 1.5}, "clip_low_threshold exceeds clip_high_threshold"),
        ("dapo", {"eps_clip_c": 0.5}, "eps_clip_c must be > 1"),
        ("cross_entropy", {"output": 1.0}, "loss_fn_config.output"),
        ("dro", {"beta": "big"}, "loss_fn_config.beta must be a number"),
    ],
)
def test_bad_config_is_a_user_error(name: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_loss(name).parse_config(config)


def test_missing_input_names_the_input() -> None:
    _, inputs = make_inputs()
    del inputs["advantages"]
    with pytest.raises(UserError, match=r"data\[3\]\.loss_fn_inputs\.advantages is required"):
        get_loss("ppo").check_inputs(inputs, "data[3]")


def test_loss_token_mask_follows_the_normalisation_rule() -> None:
    _, inputs = make_inputs()
    ce, rl = get_loss("cross_entropy"), get_loss("ppo")
    assert int(ce.loss_token_mask(inputs).sum()) == 5  # weights != 0
    del inputs["weights"]
    assert int(ce.loss_token_mask(inputs).sum()) == 6  # absent weights: every token
    assert int(rl.loss_token_mask(inputs).sum()) == 5  # advantages != 0


def test_loss_output_is_a_sum() -> None:
    out = LossOutput(torch.tensor([1.0, 2.0, 3.0]))
    assert float(out.loss) == 6.0
