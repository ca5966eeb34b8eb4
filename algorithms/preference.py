"""Preference pairs for DPO and ORPO: datasets of `PreferenceRow`s, rendering, datums, toy task.

A file is validated in full before any compute (its three accepted forms are read by
`algorithms.preference_forms`), with the file, line and field of each problem. A rendered pair
keeps the length of its sides' common token prefix, from which both losses start counting.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

import fsspec
from tinker import types

from algorithms.chat import ChatMessage, ChatRenderer
from algorithms.datasets import (
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_MAX_PROBLEMS,
    DatasetError,
    DatasetProblem,
    RowDataset,
    fingerprint_bytes,
    generated_dataset,
    parse_json_object,
    read_lines,
)
from algorithms.datums import datum_from_tokens
from algorithms.preference_forms import (
    PreferenceRow,
    PreferenceSide,
    RowProblemsError,
    parse_preference,
    read_row,
    side_problem,
)
from algorithms.toy_tasks import REVERSE_LETTERS, TOY_TASKS, Split, reverse_rows

__all__ = [
    "PREFERENCE_TASKS",
    "REVERSE_PAIRS",
    "PairGenerator",
    "PreferenceDataset",
    "PreferenceRow",
    "PreferenceTask",
    "RenderedPair",
    "corrupt_reversal",
    "load_preference_dataset",
    "load_preference_source",
    "pair_datums",
    "pair_problem",
    "parse_preference",
    "preference_rows_to_jsonl",
    "render_pair",
    "response_index",
    "reverse_pair_rows",
    "side_problem",
    "side_tokens",
    "write_preference_jsonl",
]

logger = logging.getLogger(__name__)


def preference_rows_to_jsonl(rows: Iterable[PreferenceRow]) -> bytes:
    """The canonical JSONL bytes of rows (chosen/rejected form, None fields left out)."""
    lines = [_dumps(row.jsonl_dict()) + "\n" for row in rows]
    return "".join(lines).encode("utf-8")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def write_preference_jsonl(rows: Iterable[PreferenceRow], path: str | Path) -> str:
    """Write rows as JSONL to a local path or fsspec URL; returns the file's fingerprint."""
    data = preference_rows_to_jsonl(rows)
    with fsspec.open(str(path), "wb") as handle:
        handle.write(data)
    return fingerprint_bytes(data)


@dataclass(frozen=True)
class PreferenceDataset(RowDataset[PreferenceRow]):
    """Validated preference pairs, written in the chosen/rejected form."""

    @classmethod
    def to_jsonl(cls, rows: Iterable[PreferenceRow]) -> bytes:
        return preference_rows_to_jsonl(rows)


# -- reading a file -----------------------------------------------------------------------------


def load_preference_dataset(
    source: str | Path,
    *,
    max_rows: int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> PreferenceDataset:
    """Read and validate a whole preference JSONL file (local path or fsspec URL).

    Every line is checked before anything is returned (blank lines skipped), except that
    once `max_rows` valid pairs are kept the later lines are only hashed, as the SFT reader
    does. Raises `DatasetError` listing the problems with file, line and field.
    """
    name = str(source)
    _check_file(name)
    digest = hashlib.sha256()
    rows: list[PreferenceRow] = []
    line_numbers: list[int] = []
    problems: list[DatasetProblem] = []
    with fsspec.open(name, "rb") as handle:
        for line, raw in enumerate(read_lines(handle, digest, max_line_bytes), start=1):
            if max_rows is not None and len(rows) >= max_rows:
                continue
            if raw is None:
                message = f"line longer than max_line_bytes ({max_line_bytes} bytes); not parsed"
                problems.append(DatasetProblem(name, line, "(line)", message))
                continue
            if not raw.strip() or (value := parse_json_object(name, line, raw, problems)) is None:
                continue
            try:
                rows.append(read_row(value))
                line_numbers.append(line)
            except RowProblemsError as exc:
                problems.extend(DatasetProblem(name, line, f, m) for f, m in exc.problems)
            except RecursionError:
                problems.append(DatasetProblem(name, line, "(row)", "nested too deeply"))
    if not rows and not problems:
        problems.append(DatasetProblem(name, 0, "(file)", "no preference pairs"))
    if problems:
        raise DatasetError(problems[:max_problems], total=len(problems))
    fingerprint = "sha256:" + digest.hexdigest()
    logger.info("preference dataset %s: %d pairs, %s", name, len(rows), fingerprint)
    return PreferenceDataset(name, tuple(rows), tuple(line_numbers), fingerprint)


def _check_file(source: str) -> None:
    """A missing file or a directory is one problem of the file as a whole."""
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        tasks = ", ".join(sorted(PREFERENCE_TASKS))
        hint = f"no such file, and not a preference task ({tasks})"
        if source in TOY_TASKS:
            hint = f"{source!r} is an SFT task; preference tasks: {tasks}"
        raise DatasetError([DatasetProblem(source, 0, "(file)", hint)])
    if fs.isdir(path):
        problem = DatasetProblem(source, 0, "(file)", "a directory, not a preference JSONL file")
        raise DatasetError([problem])


# -- rendering and datums -----------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPair:
    """Both sides' full token sequences and the length of their common token prefix."""

    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    response_start: int


def side_tokens(side: PreferenceSide, renderer: ChatRenderer) -> tuple[int, ...]:
    """A conversation through the chat template (as SFT renders it); text through the tokenizer.

    Text starts with BOS when both the tokenizer and the chat template start a sequence with
    it (Llama-style), so a text side begins as a conversation would; a BOS id that the
    template only uses as its turn marker (SmolLM2's `<|im_start|>`) is not added to text.
    """
    if not isinstance(side, str):
        return renderer.build_supervised_example(side).tokens
    tokens = [int(t) for t in renderer.tokenizer.encode(side, add_special_tokens=False)]
    return (*_text_start(renderer), *tokens)


@functools.lru_cache(maxsize=8)
def _text_start(renderer: ChatRenderer) -> tuple[int, ...]:
    """(BOS,) when the tokenizer and the chat template both begin sequences with BOS, else ()."""
    tokenizer = renderer.tokenizer
    bos = tokenizer.bos_token_id
    if not isinstance(bos, int):
        return ()
    tokenizer_adds = tokenizer.encode("x", add_special_tokens=True)[:1] == [bos]
    probe = renderer.build_generation_prompt([ChatMessage(role="user", content="x")])
    return (bos,) if tokenizer_adds and probe[:1] == [bos] else ()


def render_pair(row: PreferenceRow, renderer: ChatRenderer) -> RenderedPair:
    """Render each side on its own; `response_start` is where their tokens first differ."""
    chosen = side_tokens(row.chosen, renderer)
    rejected = side_tokens(row.rejected, renderer)
    start = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        start += 1
    return RenderedPair(chosen, rejected, start)


def response_index(response_start: int) -> int:
    """k = max(0, response_start - 1): the first target index that predicts a response token.

    Target t predicts token t + 1, so slicing targets at `response_start` would skip the first
    token where the sides differ.
    """
    return max(0, response_start - 1)


def pair_problem(pair: RenderedPair, *, max_tokens: int | None = None) -> str | None:
    """Why a rendered pair cannot train, or None when it can (the caller names the row)."""
    if pair.chosen == pair.rejected:
        return "chosen and rejected render to identical tokens"
    for name, tokens in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if len(tokens) <= pair.response_start:
            return f"the {name} side has no token after the common prefix (a prefix of the other)"
        if len(tokens) < 2:
            return f"the {name} side renders to fewer than 2 tokens"
        if max_tokens is not None and len(tokens) > max_tokens:
            return f"the {name} side has {len(tokens)} tokens, over the limit of {max_tokens}"
    return None


def pair_datums(pair: RenderedPair) -> tuple[types.Datum, types.Datum]:
    """(chosen, rejected) datums: input tokens[:-1], targets tokens[1:], target weight 1 from k.

    The losses read log-probabilities from k on whatever the weights say; the weights mark the
    same span so a server-side loss over these datums scores the responses only.
    """
    if (problem := pair_problem(pair)) is not None:
        raise ValueError(problem)
    return _datum(pair.chosen, pair.response_start), _datum(pair.rejected, pair.response_start)


def _datum(tokens: tuple[int, ...], response_start: int) -> types.Datum:
    # Token i + 1 is target i, so token weights from k + 1 on are target weights from k on.
    first = response_index(response_start) + 1
    return datum_from_tokens(tokens, [0.0] * first + [1.0] * (len(tokens) - first))


# -- the reverse_pairs toy task -----------------------------------------------------------------


def corrupt_reversal(answer: str, rng: random.Random) -> str:
    """A wrong answer near `answer`: one letter replaced by another, or two letters exchanged.

    Exchanging two equal letters changes nothing, so a word without two different letters is
    always corrupted by replacement; the result never equals `answer`.
    """
    pairs = [(i, j) for i in range(len(answer)) for j in range(i + 1, len(answer))]
    pairs = [(i, j) for i, j in pairs if answer[i] != answer[j]]
    letters = list(answer)
    if pairs and rng.random() < 0.5:
        i, j = rng.choice(pairs)
        letters[i], letters[j] = letters[j], letters[i]
    else:
        i = rng.randrange(len(letters))
        letters[i] = rng.choice([c for c in REVERSE_LETTERS if c != letters[i]])
    return "".join(letters)


def reverse_pair_rows(n_rows: int, *, seed: int, split: Split) -> list[PreferenceRow]:
    """The words of `reverse_rows(n_rows, seed, split)`, each a pair (correct, corrupted reversal).

    Same words and split as the SFT task; corruptions drawn from `random.Random(f"reverse_pairs:
    {split}:{seed}")`, so rows are a pure function of (n_rows, seed, split).
    """
    rng = random.Random(f"reverse_pairs:{split}:{seed}")
    rows: list[PreferenceRow] = []
    for sft_row in reverse_rows(n_rows, seed=seed, split=split):
        prompt, answer = sft_row.messages
        wrong = ChatMessage(role="assistant", content=corrupt_reversal(answer.content, rng))
        rows.append(PreferenceRow(chosen=[prompt, answer], rejected=[prompt, wrong]))
    return rows


class PairGenerator(Protocol):
    """Generates `n_rows` pairs of a split from a seed, deterministically."""

    def __call__(self, n_rows: int, *, seed: int, split: Split) -> list[PreferenceRow]: ...


@dataclass(frozen=True)
class PreferenceTask:
    """A generated preference task: pairs per split from a seed, and its eval metric."""

    name: str
    generate: PairGenerator
    metric: str
    default_rows: Mapping[Split, int]
    description: str  # what a model learns from it, for `fireloop tasks`

    def dataset(
        self, split: Split = "train", *, seed: int = 0, n_rows: int | None = None
    ) -> PreferenceDataset:
        """The split as an in-memory `PreferenceDataset` (fingerprinted like its JSONL)."""
        count = self.default_rows[split] if n_rows is None else n_rows
        rows = partial(self.generate, seed=seed, split=split)
        return generated_dataset(PreferenceDataset, self.name, rows, count, split, seed)


REVERSE_PAIRS: Final = PreferenceTask(
    name="reverse_pairs",
    generate=reverse_pair_rows,
    metric="eval/accuracy",
    default_rows={"train": 1024, "eval": 64},
    description="prefer the right reversal of a word over a corrupted one (DPO, ORPO)",
)

PREFERENCE_TASKS: Final[Mapping[str, PreferenceTask]] = {REVERSE_PAIRS.name: REVERSE_PAIRS}


def load_preference_source(
    source: str | Path,
    *,
    split: Split = "train",
    seed: int = 0,
    max_rows: int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> PreferenceDataset:
    """The pairs a config names: a `PREFERENCE_TASKS` name, else a JSONL path or fsspec URL.

    A task yields `max_rows` pairs (its default when None) of `split`; a file is validated in
    full and `split`/`seed` do not apply to it.
    """
    task = PREFERENCE_TASKS.get(str(source))
    if task is not None:
        return task.dataset(split, seed=seed, n_rows=max_rows)
    return load_preference_dataset(source, max_rows=max_rows, max_line_bytes=max_line_bytes)
