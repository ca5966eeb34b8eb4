"""DPO and ORPO closures: values and gradients against plain autograd references, extremes, and
one real `forward_backward_custom` round trip on the local platform's tiny model.

The references below are written from the formulas with no shared code: a Python loop over
pairs, `k` computed inline, `log(sigmoid(x))` and `log(1 - exp(a))` spelled out (safe for the
moderate values they are fed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from tinker import types

from algorithms.chat import ChatRenderer
from algorithms.datums import datum_from_tokens
from algorithms.preference import load_preference_source, pair_datums, render_pair
from algorithms.preference_losses import (
    PreferenceLossFn,
    dpo_loss,
    eval_metrics,
    log_odds,
    logprobs_of,
    orpo_loss,
    response_logprob_sums,
)
from backend import LocalPlatform
from backend.models.tokenizers import build_byte_tokenizer
from sdk import FiretitanServiceClient, FiretitanTrainingClient
from tests.trainer_support import FAST_TIMINGS, TrainerPlatform

STARTS = [0, 1, 2, 5, 3]  # k = 0, 0, 1, 4, 2: both ends of the response_start - 1 clamp
LENGTHS = [(4, 6), (3, 3), (5, 2), (7, 9), (6, 4)]  # target counts per pair (chosen, rejected)


def _leaves(
    seed: int, scale: float = 1.0, lengths: Sequence[tuple[int, int]] = LENGTHS
) -> list[torch.Tensor]:
    """Per-datum target logprobs `[c0, r0, c1, r1, ...]`, float32 leaves as tinker makes them."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [n for pair in lengths for n in pair]
    return [(-scale * torch.rand(n, generator=gen)).requires_grad_(True) for n in sizes]


def _datums(logprobs: Sequence[torch.Tensor]) -> list[types.Datum]:
    """Datums of the right lengths; the closures read only how many there are."""
    return [datum_from_tokens([1] * (lp.numel() + 1), [1.0] * (lp.numel() + 1)) for lp in logprobs]


def _copies(logprobs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [lp.detach().clone().requires_grad_(True) for lp in logprobs]


def _reference_dpo(
    beta: float, lps: list[torch.Tensor], starts: list[int], ref: list[tuple[float, float]]
) -> torch.Tensor:
    losses = []
    for j, start in enumerate(starts):
        k = start - 1 if start >= 1 else 0
        chosen = lps[2 * j][k:].double().sum()
        rejected = lps[2 * j + 1][k:].double().sum()
        margin = (chosen - ref[j][0]) - (rejected - ref[j][1])
        losses.append(-torch.log(torch.sigmoid(beta * margin)))
    return sum(losses) / len(losses)


def _reference_orpo(
    lam: float, lps: list[torch.Tensor], starts: list[int], reduction: str
) -> torch.Tensor:
    def odds(a: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(a, -50.0, -1e-6)
        return a - torch.log(1 - torch.exp(a))

    losses = []
    for j, start in enumerate(starts):
        k = start - 1 if start >= 1 else 0
        a_c = lps[2 * j][k:].double().mean()
        a_r = lps[2 * j + 1][k:].double().mean()
        ratio = odds(a_c) - odds(a_r)
        losses.append(-a_c + lam * -torch.log(torch.sigmoid(ratio)))
    total = sum(losses)
    return total / len(losses) if reduction == "mean" else total


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    loss.backward()
    grads = [leaf.grad for leaf in leaves]
    assert all(g is not None for g in grads)
    return [g for g in grads if g is not None]


def _assert_close(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


# -- DPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_dpo_value_and_gradient_match_the_reference(beta: float) -> None:
    policy = _leaves(0)
    ref = [(float(-s), float(-s - 0.5)) for s in range(len(STARTS))]
    loss, metrics = dpo_loss(beta, ref, STARTS)(_datums(policy), policy)
    expected_leaves = _copies(policy)
    expected = _reference_dpo(beta, expected_leaves, STARTS, ref)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert metrics["train/dpo_loss"] == metrics["train/loss"] == pytest.approx(expected.item())
    _assert_close(_grads(loss, policy), _grads(expected, expected_leaves))


def test_dpo_counts_from_the_target_before_the_first_response_token() -> None:
    policy = _leaves(1, lengths=[(4, 4)] * 3)
    loss, _ = dpo_loss(0.5, [(0.0, 0.0)] * 3, [0, 1, 3])(_datums(policy), policy)
    grads = _grads(loss, policy)
    # response_start 0 and 1 both give k = 0: every target counts.
    for g in grads[:4]:
        assert bool((g != 0).all())
    # response_start 3 gives k = 2: targets 0-1 (the shared prompt) get no gradient, 2-3 do.
    for g in grads[4:]:
        assert g[:2].tolist() == [0.0, 0.0] and bool((g[2:] != 0).all())


def test_dpo_metrics_by_hand() -> None:
    chosen = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -4.0, -5.0], requires_grad=True)
    # response_start 2 -> k = 1: logπ(c) = -5, logπ(r) = -9; margin = (-5 + 6) - (-9 + 8) = 2.
    loss, metrics = dpo_loss(0.5, [(-6.0, -8.0)], [2])(
        _datums([chosen, rejected]), [chosen, rejected]
    )
    assert metrics == pytest.approx(
        {
            "train/dpo_loss": math.log1p(math.exp(-1.0)),  # -log sigmoid(0.5 * 2)
            "train/loss": math.log1p(math.exp(-1.0)),
            "train/margin": 2.0,
            "train/accuracy": 1.0,
            "train/chosen_reward": 0.5,
            "train/rejected_reward": -0.5,
            "train/batch_pairs": 1.0,
        }
    )
    assert loss.item() == pytest.approx(metrics["train/loss"])


def test_dpo_with_the_policy_equal_to_its_reference_is_log_2_with_equal_prefixes_ignored() -> None:
    policy = _leaves(2)
    ref = response_logprob_sums(policy, STARTS)
    assert ref[0] == pytest.approx((policy[0].sum().item(), policy[1].sum().item()))
    assert ref[3] == pytest.approx((policy[6][4:].sum().item(), policy[7][4:].sum().item()))
    loss, metrics = dpo_loss(0.1, ref, STARTS)(_datums(policy), policy)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert (metrics["train/margin"], metrics["train/accuracy"]) == (
        pytest.approx(0.0, abs=1e-9),
        0.0,
    )
    # A different shared prefix (before k) leaves the loss unchanged.
    moved = [lp.detach().clone() for lp in policy]
    moved[6][:4] -= 3.0
    moved[7][:4] -= 3.0
    again, _ = dpo_loss(0.1, ref, STARTS)(_datums(moved), moved)
    assert again.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_dpo_with_huge_margins_is_finite(direction: float) -> None:
    chosen = torch.full((3,), -1e4 if direction < 0 else -1e-3, requires_grad=True)
    rejected = torch.full((3,), -1e4 if direction > 0 else -1e-3, requires_grad=True)
    loss, metrics = dpo_loss(1.0, [(0.0, 0.0)], [0])(
        _datums([chosen, rejected]), [chosen, rejected]
    )
    grads = _grads(loss, [chosen, rejected])
    assert math.isfinite(loss.item()) and all(bool(torch.isfinite(g).all()) for g in grads)
    if direction > 0:  # chosen far ahead: no loss, no gradient
        assert loss.item() == pytest.approx(0.0, abs=1e-9) and metrics["train/accuracy"] == 1.0
    else:  # rejected far ahead: the loss is the margin itself, the gradient saturates at beta
        assert loss.item() == pytest.approx(3e4, rel=1e-6)
        assert grads[0].tolist() == pytest.approx([-1.0] * 3)


# -- ORPO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lam", "reduction"), [(1.0, "mean"), (0.25, "mean"), (1.0, "sum"), (0.0, "mean")]
)
def test_orpo_value_and_gradient_match_the_reference(lam: float, reduction: str) -> None:
    policy = _leaves(3, scale=2.0)
    loss, metrics = orpo_loss(lam, STARTS, reduction)(_datums(policy), policy)  # type: ignore[arg-type]
    expected_leaves = _copies(policy)
    expected = _reference_orpo(lam, expected_leaves, STARTS, reduction)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert metrics["train/orpo_loss"] == metrics["train/loss"] == pytest.approx(expected.item())
    _assert_close(_grads(loss, policy), _grads(expected, expected_leaves))


def test_orpo_metrics_by_hand() -> None:
    chosen = torch.tensor([-9.0, -0.5, -1.5], requires_grad=True)
    rejected = torch.tensor([-9.0, -2.0, -4.0], requires_grad=True)
    # response_start 2 -> k = 1: a_c = -1, a_r = -3 (the first target is the shared prompt).
    loss, metrics = orpo_loss(2.0, [2])(_datums([chosen, rejected]), [chosen, rejected])
    odds_c = -1.0 - math.log(1 - math.exp(-1.0))
    odds_r = -3.0 - math.log(1 - math.exp(-3.0))
    or_loss = math.log1p(math.exp(-(odds_c - odds_r)))
    assert metrics == pytest.approx(
        {
            "train/orpo_loss": 1.0 + 2.0 * or_loss,
            "train/loss": 1.0 + 2.0 * or_loss,
            "train/sft_loss": 1.0,
            "train/or_loss": or_loss,
            "train/log_odds_ratio": odds_c - odds_r,
            "train/accuracy": 1.0,
            "train/chosen_avg_lp": -1.0,
            "train/rejected_avg_lp": -3.0,
            "train/batch_pairs": 1.0,
        }
    )
    assert loss.item() == pytest.approx(metrics["train/loss"])


@pytest.mark.parametrize(
    "value", [0.0, -1e-12, -1e-7, -1e-6, -math.log(2.0), -49.9, -50.0, -60.0, -1e4]
)
def test_orpo_log_odds_stay_finite_with_finite_gradient_at_both_ends(value: float) -> None:
    a = torch.tensor([value], dtype=torch.float64, requires_grad=True)
    out = log_odds(a)
    out.sum().backward()
    assert a.grad is not None
    assert math.isfinite(out.item()) and math.isfinite(a.grad.item())
    clamped = min(max(value, -50.0), -1e-6)
    assert out.item() == pytest.approx(clamped - math.log(-math.expm1(clamped)), rel=1e-9)


@pytest.mark.parametrize("value", [0.0, -1e-9, -50.0, -80.0])
def test_orpo_loss_is_finite_at_extreme_logprobs(value: float) -> None:
    chosen = torch.full((4,), value, requires_grad=True)
    rejected = torch.full((4,), -3.0, requires_grad=True)
    loss, metrics = orpo_loss(1.0, [0])(_datums([chosen, rejected]), [chosen, rejected])
    grads = _grads(loss, [chosen, rejected])
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # The SFT term always pulls the chosen side up, also where the clamp stops the odds term.
    assert bool((grads[0] < 0).all())


# -- shared -------------------------------------------------------------------------------------


def test_eval_metrics_run_the_same_closure_without_gradients() -> None:
    policy = _leaves(4)
    ref = [(-1.0, -2.0)] * len(STARTS)
    for loss_fn in (dpo_loss(0.1, ref, STARTS), orpo_loss(1.0, STARTS)):
        _, train = loss_fn(_datums(policy), policy)
        detached = [lp.detach() for lp in policy]
        evaluated = eval_metrics(loss_fn, _datums(detached), detached)
        assert evaluated == {key.replace("train/", "eval/"): v for key, v in train.items()}


def test_closures_refuse_inputs_that_do_not_pair_up() -> None:
    policy = _leaves(5)
    with pytest.raises(ValueError, match="10 log-probability tensors for 4 pairs"):
        orpo_loss(1.0, STARTS[:4])(_datums(policy), policy)
    with pytest.raises(ValueError, match="9 datums but 10"):
        orpo_loss(1.0, STARTS)(_datums(policy)[:9], policy)
    short = [torch.zeros(2, requires_grad=True), torch.zeros(5, requires_grad=True)]
    with pytest.raises(ValueError, match="pair 0: a side has no target at or after k=2"):
        dpo_loss(0.1, [(0.0, 0.0)], [3])(_datums(short), short)
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(0.0, [], [])
    with pytest.raises(ValueError, match="orpo_lambda must be >= 0"):
        orpo_loss(-0.1, [])
    with pytest.raises(ValueError, match="2 reference pairs for 1 pairs"):
        dpo_loss(0.1, [(0.0, 0.0)] * 2, [1])


# -- through the trainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp() -> Iterator[TrainerPlatform]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINKER_TELEMETRY", "0")
        with LocalPlatform(timings=FAST_TIMINGS) as platform:
            helper = TrainerPlatform(platform)
            yield helper
            helper.close()


def _step(
    client: FiretitanTrainingClient, datums: list[types.Datum], loss_fn: PreferenceLossFn
) -> dict[str, float]:
    output = client.forward_backward_custom(datums, loss_fn).result()
    client.optim_step(types.AdamParams(learning_rate=5e-3), None).result()
    return dict(output.metrics)


def test_dpo_and_orpo_train_through_forward_backward_custom(tp: TrainerPlatform) -> None:
    renderer = ChatRenderer(build_byte_tokenizer("plain"), name="fireloop/tiny")
    pairs = [
        render_pair(row, renderer)
        for row in load_preference_source("reverse_pairs", max_rows=8).rows
    ]
    datums = [d for pair in pairs for d in pair_datums(pair)]
    starts = [pair.response_start for pair in pairs]
    with FiretitanServiceClient(tp.create_job("preference-losses"), tp.api_key) as service:
        policy = service.create_training_client("tiny", seed=1)
        forward = policy.forward(datums, "cross_entropy").result()
        reference = response_logprob_sums(logprobs_of(forward.loss_fn_outputs), starts)
        first = _step(policy, datums, dpo_loss(0.5, reference, starts))
        # Before the first update the policy is its own reference: margin 0, loss log 2.
        assert first["train/dpo_loss"] == pytest.approx(math.log(2.0), rel=1e-5)
        assert first["train/margin"] == pytest.approx(0.0, abs=1e-4)
        for _ in range(4):
            last = _step(policy, datums, dpo_loss(0.5, reference, starts))
        assert last["train/margin"] > 0.5 and last["train/dpo_loss"] < first["train/dpo_loss"]
        orpo_first = _step(policy, datums, orpo_loss(1.0, starts))
        for _ in range(3):
            orpo_last = _step(policy, datums, orpo_loss(1.0, starts))
        assert orpo_last["train/orpo_loss"] < orpo_first["train/orpo_loss"]
        held_out = policy.forward(datums, "cross_entropy").result()
        evaluated = eval_metrics(
            dpo_loss(0.5, reference, starts), datums, logprobs_of(held_out.loss_fn_outputs)
        )
        assert evaluated["eval/margin"] > 0.5 and evaluated["eval/batch_pairs"] == 8.0
