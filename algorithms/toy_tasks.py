"""Built-in toy tasks: generated offline from a seed, scored without a model.

`reverse` is the SFT demo (`"abcd="` -> `"dcba"` + EOS, letters a-h, length 2-5), which the
tiny model learns in seconds on a CPU; `addition` (`algorithms.addition`) gives the RL demo its
SFT warm start on the same problems it then samples. Which split a word belongs to depends on
the word alone, so no seed can leak an eval word into training. A config names a task the way it
names a file: `load_sft_dataset("reverse")` and `load_sft_dataset("data/train.jsonl")` give the
same `ChatDataset` interface.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, Literal, Protocol

from algorithms.addition import addition_chat_rows
from algorithms.chat import ChatMessage, ParsedResponse, strip_trailing_assistant
from algorithms.datasets import (
    DEFAULT_MAX_LINE_BYTES,
    ChatDataset,
    ChatRow,
    generated_dataset,
    validate_dataset,
)

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]

REVERSE_LETTERS: Final = "abcdefgh"
REVERSE_MIN_LENGTH: Final = 2
REVERSE_MAX_LENGTH: Final = 5
# One word in 8 is held out for evaluation, by a hash of the word (not of the seed).
_EVAL_BUCKETS: Final = 8
_EVAL_SALT: Final = "fireloop/reverse/eval-split"
# Rejection sampling keeps 1/8 (eval) or 7/8 (train) of draws; this bound is never reached.
_MAX_DRAWS_PER_ROW: Final = 1_000


def reverse_is_eval_word(word: str) -> bool:
    """Whether `word` belongs to the eval split: `sha256(salt + word)[0] mod 8 == 0`."""
    return hashlib.sha256(f"{_EVAL_SALT}:{word}".encode()).digest()[0] % _EVAL_BUCKETS == 0


def reverse_row(word: str) -> ChatRow:
    """User `"<word>="`, assistant the reversed word (the template appends EOS)."""
    return ChatRow(
        messages=[
            ChatMessage(role="user", content=f"{word}="),
            ChatMessage(role="assistant", content=word[::-1]),
        ]
    )


def reverse_rows(n_rows: int, *, seed: int, split: Split) -> list[ChatRow]:
    """`n_rows` reversal rows of `split`, drawn from `random.Random(f"reverse:{split}:{seed}")`.

    Length uniform in 2..5, then letters uniform in a..h; words of the other split are redrawn.
    Rows may repeat within a split (there are only 64 words of length 2).
    """
    rng = random.Random(f"reverse:{split}:{seed}")  # a str seed is hashed stably (sha512)
    want_eval = split == "eval"
    rows: list[ChatRow] = []
    draws_left = _MAX_DRAWS_PER_ROW * max(n_rows, 1)
    while len(rows) < n_rows:
        if draws_left == 0:
            raise RuntimeError(f"reverse: too many words of the wrong split for {n_rows} rows")
        draws_left -= 1
        length = rng.randint(REVERSE_MIN_LENGTH, REVERSE_MAX_LENGTH)
        word = "".join(rng.choice(REVERSE_LETTERS) for _ in range(length))
        if reverse_is_eval_word(word) == want_eval:
            rows.append(reverse_row(word))
    return rows


def answer_of(row: ChatRow) -> str:
    """The reference answer: the content of the row's last assistant message."""
    for message in reversed(row.messages):
        if message.role == "assistant":
            return message.content
    raise ValueError("the row has no assistant message")


def prompt_of(row: ChatRow) -> list[ChatMessage]:
    """The messages to sample from: the row without its trailing assistant messages."""
    return strip_trailing_assistant(row.messages)


def exact_match(completion: ParsedResponse, row: ChatRow) -> float:
    """1.0 iff the completion ended with a stop token (EOS) and its text equals the answer."""
    return 1.0 if completion.stopped and completion.text == answer_of(row) else 0.0


class RowGenerator(Protocol):
    """Generates `n_rows` rows of a split from a seed, deterministically."""

    def __call__(self, n_rows: int, *, seed: int, split: Split) -> list[ChatRow]: ...


@dataclass(frozen=True)
class ToyTask:
    """A generated task: rows per split from a seed, and a per-row score in [0, 1]."""

    name: str
    generate: RowGenerator
    score: Callable[[ParsedResponse, ChatRow], float]
    metric: str  # the eval metric the score is reported under
    default_rows: Mapping[Split, int]
    description: str  # what a model learns from it, for `fireloop tasks`

    def dataset(
        self, split: Split = "train", *, seed: int = 0, n_rows: int | None = None
    ) -> ChatDataset:
        """The split as an in-memory `ChatDataset` (fingerprinted like its JSONL)."""
        count = self.default_rows[split] if n_rows is None else n_rows
        rows = partial(self.generate, seed=seed, split=split)
        return generated_dataset(ChatDataset, self.name, rows, count, split, seed)


REVERSE: Final = ToyTask(
    name="reverse",
    generate=reverse_rows,
    score=exact_match,
    metric="eval/exact_match",
    default_rows={"train": 1024, "eval": 64},
    description="reverse a word of 2-5 letters a-h: learnt by the tiny model in seconds on a CPU",
)

ADDITION: Final = ToyTask(
    name="addition",
    generate=addition_chat_rows,
    score=exact_match,
    metric="eval/exact_match",
    # 10 passes over the 20 training problems: an SFT warm start before RL on the same prompts.
    default_rows={"train": 200, "eval": 5},
    description='add two digits 0-4 ("3+4=" -> "7"): SFT warm start, then RL rewards',
)

TOY_TASKS: Final[Mapping[str, ToyTask]] = {REVERSE.name: REVERSE, ADDITION.name: ADDITION}


def load_sft_dataset(
    source: str | Path,
    *,
    split: Split = "train",
    seed: int = 0,
    max_rows: int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> ChatDataset:
    """The dataset a config names: a `TOY_TASKS` name, else a JSONL path or fsspec URL.

    A toy task yields `max_rows` rows (its default when None) of `split`; a file is validated
    in full (`validate_dataset`) and `split`/`seed` do not apply to it.
    """
    task = TOY_TASKS.get(str(source))
    if task is not None:
        return task.dataset(split, seed=seed, n_rows=max_rows)
    return validate_dataset(source, max_rows=max_rows, max_line_bytes=max_line_bytes)
