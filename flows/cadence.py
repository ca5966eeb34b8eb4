"""When a run checkpoints, hotloads and evaluates, and how its steps split into segments.

Step numbers here count optimizer steps *done*: point `p` is the moment after steps
`0..p-1` ran (the weights an evaluation "at step p" sees, tinker convention). A segment runs
from one cadence point to the next, so each task run ends exactly where something durable or
observable happens. Pure functions of the config: a resumed run plans the
same points as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cadence"]


def _every(point: int, interval: int) -> bool:
    return interval > 0 and point % interval == 0


@dataclass(frozen=True)
class Cadence:
    """Cadence points of a run of `max_steps` steps (intervals of 0 mean "never")."""

    max_steps: int
    checkpoint_every: int
    hotload_every: int
    eval_every: int
    has_deployment: bool
    sample_eval: bool

    def checkpoint_at(self, point: int) -> bool:
        """A resumable save at every interval and at the end."""
        return point > 0 and (_every(point, self.checkpoint_every) or point == self.max_steps)

    def eval_at(self, point: int) -> bool:
        """An evaluation at the start, every interval and the end."""
        return point == 0 or point == self.max_steps or _every(point, self.eval_every)

    def hotload_at(self, point: int, *, eval_due: bool) -> bool:
        """A hotload at every interval and at the end, and before a sample-based evaluation
        that is due (`eval_due`: the ledger has none at this point yet)."""
        if not self.has_deployment:
            return False
        if point == self.max_steps or _every(point, self.hotload_every):
            return True
        return self.sample_eval and eval_due

    def is_point(self, point: int) -> bool:
        return (
            self.checkpoint_at(point)
            or self.eval_at(point)
            or self.hotload_at(point, eval_due=False)
        )

    def segments(self, next_step: int) -> list[tuple[int, int]]:
        """`[start, end)` step ranges from `next_step` to `max_steps`, cut at every point."""
        bounds = [p for p in range(next_step + 1, self.max_steps + 1) if self.is_point(p)]
        if not bounds:
            return []
        starts = [next_step, *bounds[:-1]]
        return list(zip(starts, bounds, strict=True))
