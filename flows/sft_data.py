"""SFT data for a run: validated, measured and summarised before any compute.

`load_sft_data` reads and validates every row (a missing file, a malformed or oversized line
fails the run before any trainer exists) and fixes the eval set: an explicit `eval_dataset`, the
toy task's eval split, or a seeded carve-out of the training file. When the tokenizer is known
before provisioning (`tokenizer_model`, or the embedded platform's local model) it also renders
every row, checks it against the context length and the config against the model, and shows the
dataset summary; otherwise `render_sft_data` does the same with the trainer's tokenizer, before
the first step. `SFTBatches` then serves the batch at any raw-row cursor as a pure function of
`(seed, cursor)`, so a resumed run trains exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

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
from algorithms.datums import DropReason, SFTBatch, build_sft_batch, drop_reason
from algorithms.toy_tasks import TOY_TASKS, exact_match, load_sft_dataset, prompt_of
from flows.config import RecipeConfig, SFTConfig
from flows.notices import notice
from sdk import ConfigError
from tasks.training import StepInputs

__all__ = [
    "RenderedSFT",
    "SFTBatches",
    "SFTData",
    "carve_out_indices",
    "context_length_of",
    "known_tokenizer",
    "load_sft_data",
    "render_sft_data",
]

_MAX_CARVE_RATIO = 10  # a carve-out takes at most 1 row in 10
# An eval set this small moves by 10 % or more per row: its metrics say little.
MIN_MEANINGFUL_EVAL_ROWS: Final = 10
# Tokenizers that do not know their model's context report this huge sentinel.
_UNKNOWN_CONTEXT: Final = 1_000_000_000
_LINES_SHOWN: Final = 5
_DROP_WORDS: Final[dict[DropReason, str]] = {
    "too_long": "longer than max_seq_len",
    "too_short": "under 2 tokens",
    "no_weight": "nothing to train on after rendering",
}


@dataclass(frozen=True)
class SFTData:
    """Validated training and eval rows; `fingerprint` identifies the training data.

    `rendered` is set when the tokenizer was known before provisioning (rows already checked).
    """

    train: ChatDataset
    eval: ChatDataset | None
    eval_origin: str = "none"  # where the eval rows came from, for the summary
    rows_read: int = 0  # training rows read (before any carve-out)
    rendered: RenderedSFT | None = None

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint


def _check_source(source: str) -> None:
    """A clear error for a dataset that is neither a toy task nor an existing file."""
    if source in TOY_TASKS:
        return
    fs, path = fsspec.core.url_to_fs(source)
    tasks = ", ".join(sorted(TOY_TASKS))
    if not fs.exists(path):
        problem = DatasetProblem(source, 0, "(file)", f"no such file, and not a toy task ({tasks})")
        raise DatasetError([problem])
    if fs.isdir(path):
        problem = DatasetProblem(source, 0, "(file)", "a directory, not a chat JSONL file")
        raise DatasetError([problem])


def carve_out_indices(n_rows: int, size: int, seed: int) -> set[int]:
    """A seeded sample of min(size, 10 %) of `n_rows` row indices for an eval set (none from
    ≤ 1 row): the same rows for the same seed, whatever the recipe."""
    count = min(size, n_rows // _MAX_CARVE_RATIO)
    if n_rows <= 1 or count == 0:
        return set()
    return set(random.Random(f"carve-out:{seed}").sample(range(n_rows), count))


def _carve_out(train: ChatDataset, size: int, seed: int) -> tuple[ChatDataset, ChatDataset | None]:
    """Move a seeded sample of min(size, 10 %) rows to an eval set (none from ≤ 1 row)."""
    chosen = carve_out_indices(len(train), size, seed)
    if not chosen:
        return train, None

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
    """The run's training and eval rows, validated in full (raises `DatasetError`).

    Rendered and checked against the model here too when its tokenizer is known without a
    trainer (raises `DatasetError` for a row over the context, `ConfigError` for a setting the
    model cannot take).
    """
    data = _read_sft_data(config)
    tokenizer = known_tokenizer(config)
    if tokenizer is None:
        return data
    from transformers import AutoTokenizer  # slow to import: only when it is used

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tokenizer))
    return replace(data, rendered=render_sft_data(data, renderer, config))


def _read_sft_data(config: SFTConfig) -> SFTData:
    _check_source(config.dataset)
    train = load_sft_dataset(
        config.dataset,
        seed=config.seed,
        max_rows=config.max_rows,
        max_line_bytes=config.max_line_bytes,
    )
    if config.eval_dataset is not None:
        _check_source(config.eval_dataset)
        evaluation = load_sft_dataset(
            config.eval_dataset,
            split="eval",
            seed=config.seed,
            max_rows=config.eval_size,
            max_line_bytes=config.max_line_bytes,
        )
        return SFTData(train, evaluation, f"eval_dataset {config.eval_dataset}", len(train))
    task = TOY_TASKS.get(config.dataset)
    if task is not None:
        evaluation = task.dataset("eval", seed=config.seed, n_rows=config.eval_size)
        return SFTData(train, evaluation, f"the {task.name} task's eval split", len(train))
    kept, carved = _carve_out(train, config.eval_size, config.seed)
    origin = "a carve-out of the training file" if carved is not None else "none"
    return SFTData(kept, carved, origin, len(train))


def known_tokenizer(config: RecipeConfig) -> str | None:
    """The tokenizer the trainer will use, when it is known before provisioning.

    On the embedded platform this also checks `lora_rank` against the local model.
    """
    if config.tokenizer_model is not None:
        return config.tokenizer_model
    if config.platform is not None:
        return None  # a remote trainer names its tokenizer once it runs
    from flows.embedded import local_model_facts

    facts = local_model_facts(config.base_model)
    if facts is None:
        return None  # an unknown model: the platform refuses it with the list it serves
    if config.lora_rank > facts.max_lora_rank:
        raise ConfigError(
            f"lora_rank {config.lora_rank} is larger than {config.base_model} allows "
            f"({facts.max_lora_rank}, its narrowest adapted layer); 0 = full-parameter"
        )
    return facts.tokenizer_dir


def context_length_of(renderer: ChatRenderer) -> int | None:
    """The tokenizer's `model_max_length` (the local models set their context), if it knows."""
    length = getattr(renderer.tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNKNOWN_CONTEXT:
        return length
    return None


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
    """Render and check every row now, so no bad row is found when its batch trains.

    A row longer than the model's context fails, named by file and line, unless `max_seq_len`
    is set: rows over it are dropped and counted. Data already rendered at load time is reused.
    """
    if data.rendered is not None:
        return data.rendered
    context = context_length_of(renderer)
    if config.max_seq_len is not None and context is not None and config.max_seq_len > context:
        raise ConfigError(
            f"max_seq_len {config.max_seq_len} is larger than the model's context ({context})"
        )
    train = render_dataset(data.train, renderer, config.train_on_what)
    _check_context(data.train, train, context, config.max_seq_len)
    if not any(
        len(example.tokens) <= (config.max_seq_len or len(example.tokens)) for example in train
    ):
        raise DatasetError(
            [DatasetProblem(data.train.source, 0, "max_seq_len", "every row is longer")]
        )
    eval_datums: list[types.Datum] = []
    prompts: list[list[int]] = []
    eval_examples: list[SupervisedExample] = []
    if data.eval is not None:
        eval_examples = render_dataset(data.eval, renderer, config.train_on_what)
        _check_context(data.eval, eval_examples, context, config.max_seq_len)
        batch = build_sft_batch(
            list(enumerate(eval_examples)),
            loss_reduction=config.loss_reduction,
            max_seq_len=config.max_seq_len,
        )
        eval_datums = list(batch.datums)
        prompts = [renderer.build_generation_prompt(prompt_of(row)) for row in data.eval.rows]
    _show_summary(data, train, eval_examples, context, config)
    return RenderedSFT(train, eval_datums, prompts, data.eval, renderer)


def _check_context(
    dataset: ChatDataset,
    examples: Sequence[SupervisedExample],
    context: int | None,
    max_seq_len: int | None,
) -> None:
    """Refuse rows over the context, by file and line (with `max_seq_len` they are dropped)."""
    if context is None or max_seq_len is not None:
        return
    source = dataset.source.removesuffix("#train").removesuffix("#eval")  # a carve-out's file
    problems = [
        DatasetProblem(
            source,
            line,
            "messages",
            f"{len(example.tokens)} tokens, more than the model's context of {context}; "
            "shorten it, or set max_seq_len to drop longer rows",
        )
        for example, line in zip(examples, dataset.line_numbers, strict=True)
        if len(example.tokens) > context
    ]
    if problems:
        raise DatasetError(problems[:20], total=len(problems))


def _show_summary(
    data: SFTData,
    train: Sequence[SupervisedExample],
    eval_examples: Sequence[SupervisedExample],
    context: int | None,
    config: SFTConfig,
) -> None:
    """The dataset summary a person reads before training starts (the CLI prints notices)."""
    for line in summary_lines(data, train, eval_examples, context, config):
        level = logging.WARNING if line.startswith("warning:") else logging.INFO
        notice(line, level=level)


def summary_lines(
    data: SFTData,
    train: Sequence[SupervisedExample],
    eval_examples: Sequence[SupervisedExample],
    context: int | None,
    config: SFTConfig,
) -> list[str]:
    """Rows, split, tokens, dropped rows and why, batch capping, and a small-eval warning."""
    n_eval = len(data.eval) if data.eval is not None else 0
    lines = [
        f"dataset {config.dataset}: {data.rows_read} rows read; train {len(data.train)}, "
        f"eval {n_eval} (eval from {data.eval_origin})"
    ]
    sizes = [len(example.tokens) for example in train]
    limit = f"; context {context}" if context is not None else ""
    lines.append(
        f"train tokens: {sum(sizes)} total, max {max(sizes)}, mean {sum(sizes) / len(sizes):.1f} "
        f"per row{limit}"
    )
    lines.extend(_dropped_lines("train", data.train, train, config.max_seq_len))
    if data.eval is not None:
        lines.extend(_dropped_lines("eval", data.eval, eval_examples, config.max_seq_len))
    if config.batch_size > len(train):
        lines.append(
            f"batch_size {config.batch_size} capped to {len(train)}: the training set is smaller"
        )
    if n_eval < MIN_MEANINGFUL_EVAL_ROWS:
        lines.append(
            f"warning: the eval set has {n_eval} rows; its metrics mean little under "
            f"{MIN_MEANINGFUL_EVAL_ROWS} (set eval_dataset, or eval_size for a toy task)"
        )
    return lines


def _dropped_lines(
    label: str,
    dataset: ChatDataset,
    examples: Sequence[SupervisedExample],
    max_seq_len: int | None,
) -> list[str]:
    """One line per drop reason: how many rows, why, and the first few file lines."""
    by_reason: dict[DropReason, list[int]] = {}
    for example, line in zip(examples, dataset.line_numbers, strict=True):
        reason = drop_reason(example, max_seq_len)
        if reason is not None:
            by_reason.setdefault(reason, []).append(line)
    counts = Counter({reason: len(lines) for reason, lines in by_reason.items()})
    out = []
    for reason, count in counts.most_common():
        shown = ", ".join(str(line) for line in by_reason[reason][:_LINES_SHOWN])
        more = ", …" if count > _LINES_SHOWN else ""
        why = _DROP_WORDS[reason] + (f" {max_seq_len}" if reason == "too_long" else "")
        where = f"{'line' if count == 1 else 'lines'} {shown}{more}"
        out.append(f"{label}: {count} of {len(examples)} rows dropped: {why} ({where})")
    return out


class SFTBatches:
    """The batch at a raw-row cursor: rows in `epoch_order(seed, epoch)`, epoch after epoch.

    A plain class (no dataclass) on purpose: Prefect walks dataclass and pydantic task
    arguments, and this one holds the whole rendered training set.
    """

    def __init__(self, examples: Sequence[SupervisedExample], config: SFTConfig) -> None:
        self._examples = list(examples)
        self._seed = config.seed
        # Capped, so that a set smaller than a batch still trains.
        self._batch_size = min(config.batch_size, len(self._examples))
        self._shuffle = config.shuffle
        self._loss_reduction = config.loss_reduction
        self._max_seq_len = config.max_seq_len

    @property
    def rows_per_epoch(self) -> int:
        return len(self._examples)

    def batch(self, cursor: int) -> StepInputs[SFTBatch]:
        n_rows = len(self._examples)
        indices, after = next_batch(
            self._seed, cursor, self._batch_size, n_rows, shuffle=self._shuffle
        )
        batch = build_sft_batch(
            [(index, self._examples[index]) for index in indices],
            loss_reduction=self._loss_reduction,
            max_seq_len=self._max_seq_len,
        )
        return StepInputs(batch, tuple(indices), after, cursor // n_rows)
