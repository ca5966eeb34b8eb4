"""Preference data for a DPO or ORPO run: validated, rendered and checked before any compute.

`load_preference_data` reads every pair (the three accepted JSONL forms, or the
`reverse_pairs` toy task) and fixes the eval pairs: an explicit `eval_dataset`, the toy task's
eval split, or a seeded carve-out of the training file. When the tokenizer is known before
provisioning it also renders every pair and refuses, by file and line, a pair whose sides
render alike, one side a prefix of the other, or a side over the model's context; otherwise
`render_preference_data` does the same with the trainer's tokenizer, before the first step.
`PairBatches` serves the pairs at any raw-row cursor as a pure function of `(seed, cursor)`,
so a resumed run continues from the exact pair the lost attempt had reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from algorithms.chat import ChatRenderer
from algorithms.datasets import DatasetError, DatasetProblem, next_batch
from algorithms.preference import (
    PREFERENCE_TASKS,
    PreferenceDataset,
    RenderedPair,
    load_preference_source,
    pair_problem,
    render_pair,
)
from flows.config import PreferenceConfig
from flows.notices import notice
from flows.sft_data import carve_out_indices, context_length_of, known_tokenizer
from tasks.training import StepInputs

__all__ = [
    "PairBatch",
    "PairBatches",
    "PreferenceData",
    "RenderedPreference",
    "load_preference_data",
    "render_preference_data",
]


@dataclass(frozen=True)
class RenderedPreference:
    """Every training and eval pair rendered: full token sequences and common prefix."""

    train: tuple[RenderedPair, ...]
    eval: tuple[RenderedPair, ...]


@dataclass(frozen=True)
class PreferenceData:
    """Validated training and eval pairs; `fingerprint` identifies the training data.

    `rendered` is set when the tokenizer was known before provisioning (pairs already checked).
    """

    train: PreferenceDataset
    eval: PreferenceDataset | None
    eval_origin: str
    rendered: RenderedPreference | None = None

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint


def load_preference_data(config: PreferenceConfig) -> PreferenceData:
    """The run's training and eval pairs, validated in full (raises `DatasetError`)."""
    data = _read(config)
    tokenizer = known_tokenizer(config)
    if tokenizer is None:
        return data
    from transformers import AutoTokenizer  # slow to import: only when it is used

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tokenizer))
    return replace(data, rendered=render_preference_data(data, renderer, config))


def _read(config: PreferenceConfig) -> PreferenceData:
    def load(source: str, split: str, max_rows: int | None) -> PreferenceDataset:
        return load_preference_source(
            source,
            split="eval" if split == "eval" else "train",
            seed=config.seed,
            max_rows=max_rows,
            max_line_bytes=config.max_line_bytes,
        )

    train = load(config.dataset, "train", config.max_rows)
    if config.eval_dataset is not None:
        evaluation = load(config.eval_dataset, "eval", config.eval_size)
        return PreferenceData(train, evaluation, f"eval_dataset {config.eval_dataset}")
    if config.dataset in PREFERENCE_TASKS:
        evaluation = load(config.dataset, "eval", config.eval_size)
        return PreferenceData(train, evaluation, f"the {config.dataset} task's eval split")
    held_out = carve_out_indices(len(train), config.eval_size, config.seed)
    if not held_out:
        return PreferenceData(train, None, "none")
    kept = _subset(train, [i for i in range(len(train)) if i not in held_out], "train")
    carved = _subset(train, sorted(held_out), "eval")
    return PreferenceData(kept, carved, "a carve-out of the training file")


def _subset(dataset: PreferenceDataset, indices: Sequence[int], label: str) -> PreferenceDataset:
    return PreferenceDataset(
        source=f"{dataset.source}#{label}",
        rows=tuple(dataset.rows[i] for i in indices),
        line_numbers=tuple(dataset.line_numbers[i] for i in indices),
        fingerprint=dataset.fingerprint,
    )


def render_preference_data(
    data: PreferenceData, renderer: ChatRenderer, config: PreferenceConfig
) -> RenderedPreference:
    """Render and check every pair now, so no bad pair is found when its batch trains."""
    if data.rendered is not None:
        return data.rendered
    context = context_length_of(renderer)
    train = _render(data.train, renderer, context)
    evaluation = _render(data.eval, renderer, context) if data.eval is not None else ()
    n_eval = len(evaluation)
    sizes = [len(pair.chosen) + len(pair.rejected) for pair in train]
    notice(
        f"dataset {config.dataset}: {len(train)} training pairs, {n_eval} eval pairs "
        f"(eval from {data.eval_origin}); {sum(sizes)} tokens, at most "
        f"{max(sizes)} per pair" + (f"; context {context}" if context is not None else "")
    )
    if config.batch_size > len(train):
        notice(f"batch_size {config.batch_size} capped to {len(train)}: the set is smaller")
    return RenderedPreference(train, evaluation)


def _render(
    dataset: PreferenceDataset, renderer: ChatRenderer, context: int | None
) -> tuple[RenderedPair, ...]:
    source = dataset.source.removesuffix("#train").removesuffix("#eval")  # a carve-out's file
    pairs: list[RenderedPair] = []
    problems: list[DatasetProblem] = []
    for row, line in zip(dataset.rows, dataset.line_numbers, strict=True):
        pair = render_pair(row, renderer)
        problem = pair_problem(pair, max_tokens=context)
        if problem is not None:
            problems.append(DatasetProblem(source, line, "(pair)", problem))
        pairs.append(pair)
    if problems:
        raise DatasetError(problems[:20], total=len(problems))
    return tuple(pairs)


@dataclass(frozen=True)
class PairBatch:
    """The pairs of one optimizer step, with their row indices (the reference cache's keys)."""

    row_indices: tuple[int, ...]
    pairs: tuple[RenderedPair, ...]

    @property
    def response_starts(self) -> list[int]:
        return [pair.response_start for pair in self.pairs]


class PairBatches:
    """The pairs at a raw-row cursor: rows in `epoch_order(seed, epoch)`, epoch after epoch.

    A plain class on purpose: Prefect walks dataclass and pydantic task arguments, and this one
    holds the whole rendered training set.
    """

    def __init__(self, pairs: Sequence[RenderedPair], config: PreferenceConfig) -> None:
        self._pairs = list(pairs)
        self._seed, self._shuffle = config.seed, config.shuffle
        self._batch_size = min(config.batch_size, len(self._pairs))

    def batch(self, cursor: int) -> StepInputs[PairBatch]:
        n_rows = len(self._pairs)
        indices, after = next_batch(
            self._seed, cursor, self._batch_size, n_rows, shuffle=self._shuffle
        )
        batch = PairBatch(tuple(indices), tuple(self._pairs[i] for i in indices))
        return StepInputs(batch, tuple(indices), after, cursor // n_rows)
