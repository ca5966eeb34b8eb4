"""RL prompts: `PromptRow` JSONL validated in full, rendered for sampling, the RL toy tasks.

A bad prompt must stop the run before a trainer exists, with the file, the 1-based line and the
field. A row keeps every extra key (a reward may read it); trailing assistant messages are the
reference answer's turn, not the prompt, and are cut before sampling. Each sample's seed is a
pure function of (seed, row, sample), so a replayed window samples exactly what it sampled before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from algorithms.addition import addition_answer, addition_draws, addition_problem
from algorithms.chat import ChatMessage, ChatRenderer, ChatTemplateError, strip_trailing_assistant
from algorithms.datasets import (
    DEFAULT_MAX_LINE_BYTES,
    DEFAULT_MAX_PROBLEMS,
    DatasetError,
    DatasetProblem,
    RowDataset,
    error_message,
    field_path,
    generated_dataset,
    parse_json_object,
    read_lines,
)
from algorithms.toy_tasks import TOY_TASKS, Split

__all__ = [
    "ADDITION_PROMPTS",
    "RL_TASKS",
    "PromptDataset",
    "PromptRow",
    "RLTask",
    "addition_prompt_rows",
    "load_prompt_dataset",
    "load_prompt_source",
    "render_prompt",
    "render_prompts",
    "sample_seed",
]

logger = logging.getLogger(__name__)

_SEED_BITS: Final = 63  # non-negative and within a signed 64-bit integer, as servers take seeds


class PromptRow(BaseModel):
    """One RL prompt: `messages` (the prompt turns), optional `ground_truth`, any extra keys.

    Extra keys are kept (`row.model_extra`) for the reward. `prompt` is `messages` without its
    trailing assistant messages, and must hold a user turn. A numeric `ground_truth` is read
    as its decimal text.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    ground_truth: str | None = None

    @field_validator("ground_truth", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("messages")
    @classmethod
    def _prompt_has_a_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        prompt = strip_trailing_assistant(messages)
        if not prompt:
            raise ValueError("no prompt: every message is an assistant message")
        if not any(message.role == "user" for message in prompt):
            raise ValueError("the prompt has no user message")
        return messages

    @property
    def prompt(self) -> list[ChatMessage]:
        """The messages to sample from: trailing assistant messages cut, history kept."""
        return strip_trailing_assistant(self.messages)


@dataclass(frozen=True)
class PromptDataset(RowDataset[PromptRow]):
    """Validated RL prompt rows (extra keys kept for the reward)."""


def load_prompt_dataset(
    source: str | Path,
    *,
    max_rows: int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> PromptDataset:
    """Read and validate a whole RL prompt JSONL file (local path or fsspec URL).

    Every line is checked before anything is returned (blank lines skipped); once `max_rows`
    rows are kept, later lines are only hashed. Raises `DatasetError` listing the problems with
    file, line and field.
    """
    name = str(source)
    _check_file(name)
    digest = hashlib.sha256()
    rows: list[PromptRow] = []
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
            row = _validate_row(name, line, value, problems)
            if row is not None:
                rows.append(row)
                line_numbers.append(line)
    if not rows and not problems:
        problems.append(DatasetProblem(name, 0, "(file)", "no prompts"))
    if problems:
        raise DatasetError(problems[:max_problems], total=len(problems))
    fingerprint = "sha256:" + digest.hexdigest()
    logger.info("prompt dataset %s: %d rows, %s", name, len(rows), fingerprint)
    return PromptDataset(name, tuple(rows), tuple(line_numbers), fingerprint)


def _validate_row(
    source: str, line: int, value: dict[str, Any], problems: list[DatasetProblem]
) -> PromptRow | None:
    try:
        return PromptRow.model_validate(value)
    except RecursionError:
        problems.append(DatasetProblem(source, line, "(row)", "nested too deeply"))
    except ValidationError as exc:
        for error in exc.errors():
            field = field_path(error["loc"])
            problems.append(DatasetProblem(source, line, field, error_message(error)))
    return None


def _check_file(source: str) -> None:
    """A missing file or a directory is one problem of the file as a whole."""
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        tasks = ", ".join(sorted(RL_TASKS))
        hint = f"no such file, and not an RL task ({tasks})"
        if source in TOY_TASKS and source not in RL_TASKS:
            hint = f"{source!r} is an SFT task; RL tasks: {tasks}"
        raise DatasetError([DatasetProblem(source, 0, "(file)", hint)])
    if fs.isdir(path):
        raise DatasetError([DatasetProblem(source, 0, "(file)", "a directory, not a JSONL file")])


# -- seeds and rendering ------------------------------------------------------------------------


def sample_seed(seed: int, row_index: int, sample_index: int) -> int:
    """The sampling seed of sample `sample_index` of row `row_index` in a run seeded `seed`.

    The first 63 bits of `sha256("seed:row:sample")`: the same in every process and Python
    version (unlike `hash`, which is salted per process), and far apart for neighbouring
    arguments, so the G samples of a row and the rows of a window draw independent streams.
    """
    digest = hashlib.sha256(f"{seed}:{row_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def render_prompt(row: PromptRow, renderer: ChatRenderer) -> list[int]:
    """The prompt ids to sample the next assistant message from (trailing assistants cut)."""
    return renderer.build_generation_prompt(row.prompt)


def render_prompts(
    dataset: PromptDataset,
    renderer: ChatRenderer,
    *,
    max_completion_tokens: int,
    context_length: int,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> list[list[int]]:
    """Every row's prompt ids, checked up front: a prompt the template cannot render, or one
    whose tokens plus `max_completion_tokens` exceed `context_length`, is a problem naming its
    file and line. Raises `DatasetError`; rendering is deterministic, so a later render of the
    same row gives the same ids.
    """
    if max_completion_tokens < 1 or context_length < 1:
        raise ValueError(f"need positive lengths, got {max_completion_tokens=} {context_length=}")
    prompts: list[list[int]] = []
    problems: list[DatasetProblem] = []
    for row, line in zip(dataset.rows, dataset.line_numbers, strict=True):
        try:
            ids = render_prompt(row, renderer)
        except ChatTemplateError as exc:
            problems.append(DatasetProblem(dataset.source, line, "messages", str(exc)))
            continue
        if len(ids) + max_completion_tokens > context_length:
            message = (
                f"prompt of {len(ids)} tokens + max_completion_tokens {max_completion_tokens}"
                f" exceeds the context of {context_length} tokens"
            )
            problems.append(DatasetProblem(dataset.source, line, "messages", message))
        prompts.append(ids)
    if problems:
        raise DatasetError(problems[:max_problems], total=len(problems))
    return prompts


# -- RL toy tasks -------------------------------------------------------------------------------


def addition_prompt_rows(n_rows: int, *, seed: int, split: Split) -> list[PromptRow]:
    """`n_rows` RL prompts of `split`: user `"a+b="`, `ground_truth` the sum.

    The same pairs, in the same order, as the SFT rows of `addition` for the same arguments.
    """
    return [
        PromptRow(
            messages=[ChatMessage(role="user", content=addition_problem(pair))],
            ground_truth=addition_answer(pair),
        )
        for pair in addition_draws(n_rows, seed=seed, split=split)
    ]


class PromptGenerator(Protocol):
    """Generates `n_rows` prompts of a split from a seed, deterministically."""

    def __call__(self, n_rows: int, *, seed: int, split: Split) -> list[PromptRow]: ...


@dataclass(frozen=True)
class RLTask:
    """A generated RL task: prompts per split from a seed, and its built-in reward's name."""

    name: str
    generate: PromptGenerator
    reward: str  # a name in `algorithms.rewards.BUILTIN_REWARDS`
    default_rows: Mapping[Split, int]
    description: str

    def dataset(
        self, split: Split = "train", *, seed: int = 0, n_rows: int | None = None
    ) -> PromptDataset:
        """The split as an in-memory `PromptDataset` (fingerprinted like its JSONL)."""
        count = self.default_rows[split] if n_rows is None else n_rows
        rows = partial(self.generate, seed=seed, split=split)
        return generated_dataset(PromptDataset, self.name, rows, count, split, seed)


ADDITION_PROMPTS: Final = RLTask(
    name="addition",
    generate=addition_prompt_rows,
    reward="exact_answer",
    # One pass over each split's distinct problems; epochs repeat them in a new order.
    default_rows={"train": 20, "eval": 5},
    description='answer "a+b=" (a, b in 0-4) with exactly the sum, then stop',
)

RL_TASKS: Final[Mapping[str, RLTask]] = {ADDITION_PROMPTS.name: ADDITION_PROMPTS}


def load_prompt_source(
    source: str | Path,
    *,
    split: Split = "train",
    seed: int = 0,
    max_rows: int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> PromptDataset:
    """The prompts a config names: an `RL_TASKS` name, else a JSONL path or fsspec URL.

    A task yields `max_rows` prompts (its default when None) of `split`; a file is validated
    in full and `split`/`seed` do not apply to it.
    """
    task = RL_TASKS.get(str(source))
    if task is not None:
        return task.dataset(split, seed=seed, n_rows=max_rows)
    return load_prompt_dataset(source, max_rows=max_rows, max_line_bytes=max_line_bytes)
