"""What an RL loss needs besides the current log-probs: one `RLSample` per completion.

Every per-token field is aligned to the datum's target positions (target t predicts token
t + 1), with the mask 0 on the prompt; values there are ignored. Stored as detached float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TokenValues = Sequence[float] | torch.Tensor


def _tokens(values: TokenValues, field: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1).clone()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{field} holds a value that is not finite")
    return tensor


@dataclass(frozen=True, init=False, eq=False)
class RLSample:
    """One completion: response mask m, sampler log-probs π_inf, advantage A (one number,
    broadcast over the response), old-policy π_old and reference π_ref log-probs if known.

    Without π_old the closure takes π_old = sg(π) from its own forward, which is exact with
    one minibatch per rollout batch (that forward runs at the old-policy weights).
    """

    mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantage: float
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None

    def __init__(
        self,
        mask: TokenValues,
        sampler_logprobs: TokenValues,
        advantage: float,
        old_logprobs: TokenValues | None = None,
        ref_logprobs: TokenValues | None = None,
    ) -> None:
        mask_T = _tokens(mask, "mask")
        if not bool(((mask_T == 0) | (mask_T == 1)).all()):
            raise ValueError("mask must hold only 0 and 1")
        if float(mask_T.sum()) == 0:
            raise ValueError("mask has no response token")
        if not math.isfinite(advantage):
            raise ValueError(f"advantage is not finite: {advantage!r}")
        object.__setattr__(self, "mask", mask_T)
        object.__setattr__(self, "advantage", float(advantage))
        object.__setattr__(
            self, "sampler_logprobs", self._aligned(sampler_logprobs, "sampler_logprobs")
        )
        object.__setattr__(self, "old_logprobs", self._aligned(old_logprobs, "old_logprobs"))
        object.__setattr__(self, "ref_logprobs", self._aligned(ref_logprobs, "ref_logprobs"))

    def _aligned(self, values: TokenValues | None, field: str) -> torch.Tensor | None:
        """`values` as a float64 tensor with one entry per target, like the mask."""
        if values is None:
            return None
        tensor = _tokens(values, field)
        if tensor.numel() != self.mask.numel():
            raise ValueError(f"{field} has {tensor.numel()} tokens, mask has {self.mask.numel()}")
        return tensor

    @property
    def num_targets(self) -> int:
        return int(self.mask.numel())

    @property
    def advantages(self) -> torch.Tensor:
        """A broadcast over the response tokens (0 on the prompt)."""
        return self.advantage * self.mask


@dataclass(frozen=True, eq=False)
class RLBatch:
    """The samples of one optimizer step, in datum order; π_old and π_ref are all-or-none."""

    samples: tuple[RLSample, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("an RL batch needs at least one sample")
        for name in ("old_logprobs", "ref_logprobs"):
            given = [getattr(sample, name) is not None for sample in self.samples]
            if any(given) and not all(given):
                raise ValueError(
                    f"samples[{given.index(False)}].{name} is missing (others have it)"
                )

    @property
    def has_old_logprobs(self) -> bool:
        return self.samples[0].old_logprobs is not None

    @property
    def has_ref_logprobs(self) -> bool:
        return self.samples[0].ref_logprobs is not None

    @property
    def response_tokens(self) -> float:
        """Σ m over the whole batch: the token-mean denominator."""
        return float(sum(float(sample.mask.sum()) for sample in self.samples))
