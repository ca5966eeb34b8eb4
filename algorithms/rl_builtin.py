"""The builtin path of the RL losses: the server computes the loss in one `forward_backward`.

`builtin_loss` maps a policy loss and its config onto a server loss name and `loss_fn_config`;
`builtin_datums` adds the per-token inputs that loss reads (π_old as `logprobs`, A·w·m as
`advantages`, m as `weights`). Server losses are sums, so their `optim_step` takes
`BUILTIN_GRAD_NORMALIZATION`. Where no server loss is equivalent the mapping refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

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
    TISConfig,
    loss_config,
)
from algorithms.rl_inputs import RLBatch
from algorithms.rl_losses import tis_weights

# The server sums the per-token losses; dividing by Σ m over the whole step gives the client's
# token mean (the datums carry m as `weights`, which is what the server counts).
BUILTIN_GRAD_NORMALIZATION: Final = "num_loss_tokens"


def builtin_loss(
    policy_loss: PolicyLoss, config: PolicyLossConfig | None, kl_beta: float
) -> tuple[str, dict[str, float]]:
    """(server loss name, `loss_fn_config`) equivalent to the client loss, or a `ValueError`.

    The server's inputs carry no reference log-probs, so `kl_beta > 0` has no builtin form;
    REINFORCE's ratio against the sampler has no server loss. Equal to the client up to float32
    rounding, but for two corners: server DRO also pulls tokens whose advantage is exactly 0,
    and server GSPO clamps the sequence log-ratio to ±cap keeping its gradient, where the
    client caps it above only, without gradient (both beyond a sequence ratio of e^10).
    """
    checked = loss_config(policy_loss, config)
    if kl_beta > 0:
        raise ValueError(
            f"kl_beta must be 0 with loss_path='builtin' (got {kl_beta}): the server loss "
            "cannot see reference log-probs; use loss_path='client'"
        )
    if isinstance(checked, GRPOConfig):
        return "ppo", {
            **_bounds(checked.eps_clip, checked.high),
            "ratio_log_cap": checked.ratio_log_cap,
        }
    if isinstance(checked, DAPOConfig):
        dapo = {
            **_bounds(checked.eps_clip, checked.eps_clip_high),
            "ratio_log_cap": checked.ratio_log_cap,
        }
        if checked.eps_clip_c is not None:
            dapo["eps_clip_c"] = checked.eps_clip_c
        return "dapo", dapo
    if isinstance(checked, GSPOConfig):
        gspo = _bounds(checked.clip_ratio_low, checked.clip_ratio_high)
        return "gspo", {**gspo, "seq_ratio_log_cap": checked.seq_ratio_log_cap}
    if isinstance(checked, CISPOConfig):
        cispo = _bounds(checked.eps_low, checked.eps_high)
        return "cispo", {**cispo, "ratio_log_cap": checked.ratio_log_cap}
    if isinstance(checked, DROConfig):
        return "dro", {"beta": checked.beta}
    if isinstance(checked, ImportanceSamplingConfig):
        return "importance_sampling", {"ratio_log_cap": checked.ratio_log_cap}
    raise ValueError(
        "policy_loss 'reinforce' has no builtin server loss (its ratio is against the sampler "
        "log-probs); use loss_path='client'"
    )


def _bounds(low: float, high: float) -> dict[str, float]:
    """The client's clip widths as the server's absolute ratio bounds."""
    return {"clip_low_threshold": 1.0 - low, "clip_high_threshold": 1.0 + high}


def builtin_datums(
    policy_loss: PolicyLoss,
    datums: Sequence[types.Datum],
    batch: RLBatch,
    tis: TISConfig | None = None,
) -> list[types.Datum]:
    """`datums` with the server RL loss inputs, one sample per datum, in order:
    `logprobs` = π_old·m, `advantages` = A·w·m (TIS folded in), `weights` = m, and for GSPO
    `sequence_ratio_mask` = m. The prompt positions are all 0.

    `weights` = m makes the server count exactly the client's Σ m tokens (without it, it counts
    the tokens with A·w ≠ 0) and keeps DRO's quadratic term off the prompt. Every sample needs
    `old_logprobs` (the server cannot take them from its own forward); with the sampler as the
    anchor pass the sampler log-probs there (then w = 1).
    """
    if policy_loss == "reinforce":
        builtin_loss(policy_loss, None, 0.0)  # raises, naming the loss
    if len(datums) != len(batch.samples):
        raise ValueError(f"{len(datums)} datums for {len(batch.samples)} RL samples")
    tis = tis or TISConfig()
    out: list[types.Datum] = []
    for index, (datum, sample) in enumerate(zip(datums, batch.samples, strict=True)):
        if sample.old_logprobs is None:
            raise ValueError(
                f"samples[{index}].old_logprobs is required by loss_path='builtin' "
                "(the server loss reads the old-policy log-probs as an input)"
            )
        targets = datum.loss_fn_inputs["target_tokens"]
        if targets.shape is not None and list(targets.shape) != [sample.num_targets]:
            raise ValueError(
                f"datum {index} has {targets.shape} targets, RL sample {index} has "
                f"{sample.num_targets}"
            )
        mask_T = sample.mask
        tis_T = tis_weights(
            sample.old_logprobs, sample.sampler_logprobs, mask_T, **tis.model_dump()
        )
        inputs = {
            "target_tokens": targets,
            "logprobs": _float32(sample.old_logprobs * mask_T),
            "advantages": _float32(sample.advantage * tis_T * mask_T),
            "weights": _float32(mask_T),
        }
        if policy_loss == "gspo":
            # The sequence ratio averages over the response, not over the tokens with A·w ≠ 0.
            inputs["sequence_ratio_mask"] = _float32(mask_T)
        out.append(types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return out


def _float32(values_T: torch.Tensor) -> types.TensorData:
    data = [float(v) for v in values_T.to(torch.float32).tolist()]
    return types.TensorData(data=data, dtype="float32", shape=[len(data)])
