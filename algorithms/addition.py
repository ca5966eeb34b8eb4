"""The `addition` toy task's data: `"a+b="` with a, b in 0..4, answered by the sum.

There are only 25 distinct problems, so the split cannot be drawn per row: 5 problems are held
out for evaluation, the same 5 whatever the seed (no seed leaks one into training, and eval is
never empty). They are the 5 of lowest salted hash among those with a < b, so each held-out
`a+b=` has its mirror `b+a=` (same answer) in training: held-out accuracy asks whether the
model generalises across operand order, not for a sum it never saw. Rows of a split cycle
through seeded permutations of its pairs, so every pair appears equally often. The same pairs
serve SFT (a chat row with the sum as the assistant reply, for a warm start) and RL (a prompt
with the sum as `ground_truth`, in `algorithms.rl_data`).
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Final

from algorithms.chat import ChatMessage
from algorithms.datasets import ChatRow

if TYPE_CHECKING:
    from algorithms.toy_tasks import Split

ADDITION_MAX_OPERAND: Final = 4
ADDITION_EVAL_PAIRS: Final = 5  # of the 25: enough to see held-out accuracy move, 20 left to train
_EVAL_SALT: Final = "fireloop/addition/eval-split"

Pair = tuple[int, int]


def addition_problem(pair: Pair) -> str:
    """The prompt text of a pair: `"a+b="`."""
    return f"{pair[0]}+{pair[1]}="


def addition_answer(pair: Pair) -> str:
    """The reference answer of a pair: the sum in decimal."""
    return str(pair[0] + pair[1])


def _rank_key(pair: Pair) -> bytes:
    return hashlib.sha256(f"{_EVAL_SALT}:{addition_problem(pair)}".encode()).digest()


def addition_pairs(split: Split) -> list[Pair]:
    """The pairs of a split, in (a, b) order: eval is the 5 pairs of lowest salted hash with
    a < b, train the other 20 (every eval pair's mirror among them)."""
    operands = range(ADDITION_MAX_OPERAND + 1)
    every = [(a, b) for a in operands for b in operands]
    ordered = [(a, b) for a, b in every if a < b]
    held_out = set(sorted(ordered, key=_rank_key)[:ADDITION_EVAL_PAIRS])
    return [pair for pair in every if (pair in held_out) == (split == "eval")]


def addition_draws(n_rows: int, *, seed: int, split: Split) -> list[Pair]:
    """`n_rows` pairs of `split`: passes over its pairs, each pass a fresh seeded permutation.

    Drawn from `random.Random(f"addition:{split}:{seed}")`; a longer draw extends a shorter one.
    """
    rng = random.Random(f"addition:{split}:{seed}")  # a str seed is hashed stably (sha512)
    pairs = addition_pairs(split)
    drawn: list[Pair] = []
    while len(drawn) < n_rows:
        one_pass = list(pairs)
        rng.shuffle(one_pass)
        drawn.extend(one_pass)
    return drawn[:n_rows]


def addition_chat_row(pair: Pair) -> ChatRow:
    """The SFT view of a pair: user `"a+b="`, assistant the sum (the template appends EOS)."""
    return ChatRow(
        messages=[
            ChatMessage(role="user", content=addition_problem(pair)),
            ChatMessage(role="assistant", content=addition_answer(pair)),
        ]
    )


def addition_chat_rows(n_rows: int, *, seed: int, split: Split) -> list[ChatRow]:
    """`n_rows` SFT rows of `split` (the pairs of `addition_draws`)."""
    return [addition_chat_row(pair) for pair in addition_draws(n_rows, seed=seed, split=split)]
