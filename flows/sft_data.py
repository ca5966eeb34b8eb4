"""SFT data for a run: validated before provisioning, rendered once a tokenizer is known.

`load_sft_data` reads and validates every row (a missing file or a malformed line fails the
run before any trainer exists, failure-modes M2) and fixes the eval set: an explicit
`eval_dataset`, the toy task's eval split, or a seeded carve-out of the training file.
`render_sft_data` renders both sets with the trainer's tokenizer; `SFTBatches` then serves the
batch at any raw-row cursor as a pure function of `(seed, cursor)`, which is what makes a resumed
run train exactly the rows an uninterrupted one would (failure-modes R1, R2, R4, D1).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
from tinker import types

from algorithms.chat import ChatRenderer, SupervisedExample
from algorithms.datasets import (
    ChatDataset,
    DatasetError,
    DatasetProblem,
    next_batch,
    render_dataset,
)
from algorithms.datums import build_sft_batch
from algorithms.toy_tasks import TOY_TASKS, exact_match, load_sft_dataset, prompt_of
from flows.config import SFTConfig
from tasks.training import SourcedBatch

__all__ = ["RenderedSFT", "SFTBatches", "SFTData", "load_sft_data", "render_sft_data"]

_MAX_CARVE_RATIO = 10  # a carve-out takes at most 1 row in 10


@dataclass(frozen=True)
class SFTData:
    """Validated training and eval rows; `fingerprint` identifies the training data."""

    train: ChatDataset
    eval: ChatDataset | None

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint


def _check_source(source: str) -> None:
    """A clear error for a dataset that is neither a toy task nor an existing file."""
    if source in TOY_TASKS:
        return
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        tasks = ", ".join(sorted(TOY_TASKS))
        problem = DatasetProblem(source, 0, "(file)", f"no such file, and not a toy task ({tasks})")
        raise DatasetError([problem])


def _carve_out(train: ChatDataset, size: int, seed: int) -> tuple[ChatDataset, ChatDataset | None]:
    """Move a seeded sample of min(size, 10 %) rows to an eval set (none from ≤ 1 row)."""
    count = min(size, len(train) // _MAX_CARVE_RATIO)
    if len(train) <= 1 or count == 0:
        return train, None
    chosen = set(random.Random(f"carve-out:{seed}").sample(range(len(train)), count))

    def subset(keep: bool, label: str) -> ChatDataset:
        indices = [i for i in range(len(train)) if (i in chosen) == keep]
        return ChatDataset(
            source=f"{train.source}#{label}",
            rows=tuple(train.rows[i] for i in indices),
            line_numbers=tuple(train.line_numbers[i] for i in indices),
            fingerprint=train.fingerprint,
        )

    return subset(False, "train"), subset(True, "eval")


def load_sft_data(config: SFTConfig) -> SFTData:
    """The run's training and eval rows, validated in full (raises `DatasetError`)."""
    _check_source(config.dataset)
    train = load_sft_dataset(config.dataset, seed=config.seed, max_rows=config.max_rows)
    if config.eval_dataset is not None:
        _check_source(config.eval_dataset)
        evaluation = load_sft_dataset(
            config.eval_dataset, split="eval", seed=config.seed, max_rows=config.eval_size
        )
        return SFTData(train, evaluation)
    task = TOY_TASKS.get(config.dataset)
    if task is not None:
        return SFTData(train, task.dataset("eval", seed=config.seed, n_rows=config.eval_size))
    return SFTData(*_carve_out(train, config.eval_size, config.seed))


@dataclass(frozen=True)
class RenderedSFT:
    """Rendered training examples, eval datums (loss), eval prompts and their rows (sampling)."""

    train: list[SupervisedExample]
    eval_datums: list[types.Datum]
    eval_prompts: list[list[int]]
    eval_data: ChatDataset | None
    renderer: ChatRenderer

    def exact_match(self, completions: Sequence[Sequence[int]]) -> float:
        """Mean exact match of greedy completions against the eval rows' answers."""
        if self.eval_data is None or not completions:
            return 0.0
        scores = [
            exact_match(self.renderer.parse_response(tokens), row)
            for tokens, row in zip(completions, self.eval_data.rows, strict=True)
        ]
        return sum(scores) / len(scores)


def render_sft_data(data: SFTData, renderer: ChatRenderer, config: SFTConfig) -> RenderedSFT:
    """Render every row now, so a row the template cannot render fails before training."""
    train = render_dataset(data.train, renderer, config.train_on_what)
    if not any(
        len(example.tokens) <= (config.max_seq_len or len(example.tokens)) for example in train
    ):
        raise DatasetError(
            [DatasetProblem(data.train.source, 0, "max_seq_len", "every row is longer")]
        )
    eval_datums: list[types.Datum] = []
    prompts: list[list[int]] = []
    if data.eval is not None:
        examples = render_dataset(data.eval, renderer, config.train_on_what)
        batch = build_sft_batch(
            list(enumerate(examples)),
            loss_reduction=config.loss_reduction,
            max_seq_len=config.max_seq_len,
        )
        eval_datums = list(batch.datums)
        prompts = [renderer.build_generation_prompt(prompt_of(row)) for row in data.eval.rows]
    return RenderedSFT(train, eval_datums, prompts, data.eval, renderer)


class SFTBatches:
    """The batch at a raw-row cursor: rows in `epoch_order(seed, epoch)`, epoch after epoch.

    A plain class (no dataclass) on purpose: Prefect walks dataclass and pydantic task
    arguments, and this one holds the whole rendered training set.
    """

    def __init__(self, examples: Sequence[SupervisedExample], config: SFTConfig) -> None:
        self._examples = list(examples)
        self._seed = config.seed
        self._batch_size = min(config.batch_size, len(self._examples))  # capped (recipes §5)
        self._shuffle = config.shuffle
        self._loss_reduction = config.loss_reduction
        self._max_seq_len = config.max_seq_len

    @property
    def rows_per_epoch(self) -> int:
        return len(self._examples)

    def batch(self, cursor: int) -> SourcedBatch:
        n_rows = len(self._examples)
        indices, after = next_batch(
            self._seed, cursor, self._batch_size, n_rows, shuffle=self._shuffle
        )
        batch = build_sft_batch(
            [(index, self._examples[index]) for index in indices],
            loss_reduction=self._loss_reduction,
            max_seq_len=self._max_seq_len,
        )
        return SourcedBatch(batch, tuple(indices), after, cursor // n_rows)
