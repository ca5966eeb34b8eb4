"""SFT chat JSONL: validated in full before any compute, fingerprinted, read in a seeded order.

A bad row must fail the run before a trainer is provisioned, with the file, the 1-based line and
the field, so the user can fix the input before spending anything. The epoch order is a pure
function of `(seed, epoch)` and the data cursor counts raw rows consumed, so a resumed run
computes where it is instead of replaying an iterator: no row is trained twice or skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, Self, TypeVar

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from algorithms.chat import (
    ChatMessage,
    ChatRenderer,
    ChatTemplateError,
    SupervisedExample,
    TrainOnWhat,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PROBLEMS: Final = 20
# A line longer than this is refused before it is parsed: one 50 MB line would otherwise take
# minutes and gigabytes to parse and render (the limit is a config field of the recipes).
DEFAULT_MAX_LINE_BYTES: Final = 1 << 20
_READ_CHUNK_BYTES: Final = 1 << 16


class ChatRow(BaseModel):
    """One SFT row: `messages` (≥ 1) and optional `tools`; extra keys ignored.

    A row must have something to train on: an assistant message, or, when any message carries
    `weight`/`trainable`, a message marked trainable.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None  # OpenAI function specs, rendered by the template

    @field_validator("messages")
    @classmethod
    def _has_trainable_message(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if any(message.marks_trainable for message in messages):
            if not any(message.is_trainable() for message in messages):
                raise ValueError("no message is marked trainable (weight 1 / trainable true)")
        elif not any(message.role == "assistant" for message in messages):
            raise ValueError("no assistant message to train on")
        return messages


@dataclass(frozen=True)
class DatasetProblem:
    """One problem in a dataset file: where it is and what is wrong."""

    source: str
    line: int  # 1-based; 0 for the file as a whole
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


class DatasetError(ValueError):
    """A dataset file failed validation; `problems` lists the first found (file, line, field)."""

    retryable: ClassVar[bool] = False

    def __init__(self, problems: Sequence[DatasetProblem], total: int | None = None) -> None:
        self.problems = tuple(problems)
        self.total = len(self.problems) if total is None else total
        lines = [str(problem) for problem in self.problems]
        if self.total > len(lines):
            lines.append(f"... and {self.total - len(lines)} more problems")
        super().__init__(f"invalid dataset ({self.total} problems):\n" + "\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles failures; rebuild from the problems, not from the formatted message.
        return (type(self), (self.problems, self.total))


RowT = TypeVar("RowT", bound=BaseModel)


@dataclass(frozen=True)
class RowDataset(Generic[RowT]):
    """Validated rows, the 1-based source line of each, and the file's fingerprint: what every
    recipe's data is (chat rows, preference pairs, RL prompts), each with its own row model."""

    source: str
    rows: tuple[RowT, ...]
    line_numbers: tuple[int, ...]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        """`file:line` of row `index`, for errors that name the row."""
        return f"{self.source}:{self.line_numbers[index]}"

    @classmethod
    def from_rows(cls, source: str, rows: Sequence[RowT]) -> Self:
        """An in-memory dataset, fingerprinted as the JSONL `to_jsonl` writes."""
        return cls(
            source=source,
            rows=tuple(rows),
            line_numbers=tuple(range(1, len(rows) + 1)),
            fingerprint=fingerprint_bytes(cls.to_jsonl(rows)),
        )

    @classmethod
    def to_jsonl(cls, rows: Iterable[RowT]) -> bytes:
        """The canonical JSONL bytes of rows (None fields left out, one row per line)."""
        return rows_to_jsonl(rows)


@dataclass(frozen=True)
class ChatDataset(RowDataset[ChatRow]):
    """Validated SFT chat rows."""


DatasetT = TypeVar("DatasetT", bound=RowDataset[Any])


def generated_dataset(
    dataset_type: type[DatasetT],
    task: str,
    rows: Callable[[int], Sequence[Any]],
    count: int,
    split: str,
    seed: int,
) -> DatasetT:
    """A toy task's split as an in-memory dataset, named by task, split, seed and size."""
    return dataset_type.from_rows(f"toy:{task}/{split}?seed={seed}&n={count}", rows(count))


def rows_to_jsonl(rows: Iterable[BaseModel]) -> bytes:
    """The canonical JSONL bytes of rows (None fields left out, one row per line)."""
    lines = [row.model_dump_json(exclude_none=True) + "\n" for row in rows]
    return "".join(lines).encode("utf-8")


def write_jsonl(rows: Iterable[ChatRow], path: str | Path) -> str:
    """Write rows as JSONL to a local path or fsspec URL; returns the file's fingerprint."""
    data = rows_to_jsonl(rows)
    with fsspec.open(str(path), "wb") as handle:
        handle.write(data)
    return fingerprint_bytes(data)


def fingerprint_bytes(data: bytes) -> str:
    """`sha256:<hex>` of the bytes: the dataset identity a ledger records, checked on resume."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def validate_dataset(
    path: str | Path,
    *,
    max_rows: int | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> ChatDataset:
    """Read and validate a whole SFT chat JSONL file (local path or fsspec URL).

    Every line is parsed before anything is returned; blank lines are skipped. `max_rows` caps
    the rows kept (later lines are hashed, not validated). A line over `max_line_bytes` (newline
    not counted) is a problem, found without holding it in memory. The fingerprint covers every
    byte. Raises `DatasetError` listing up to `max_problems` problems with file, line and field.
    """
    source = str(path)
    digest = hashlib.sha256()
    rows: list[ChatRow] = []
    line_numbers: list[int] = []
    problems: list[DatasetProblem] = []
    with fsspec.open(source, "rb") as handle:
        for line_number, raw in enumerate(read_lines(handle, digest, max_line_bytes), start=1):
            if max_rows is not None and len(rows) >= max_rows:
                continue
            if raw is None:
                message = f"line longer than max_line_bytes ({max_line_bytes} bytes); not parsed"
                problems.append(DatasetProblem(source, line_number, "(line)", message))
                continue
            if not raw.strip():
                continue
            row = _parse_row(source, line_number, raw, problems)
            if row is not None:
                rows.append(row)
                line_numbers.append(line_number)
    if not rows and not problems:
        problems.append(DatasetProblem(source, 0, "(file)", "no rows"))
    if problems:
        raise DatasetError(problems[:max_problems], total=len(problems))
    fingerprint = "sha256:" + digest.hexdigest()
    logger.info("dataset %s: %d rows, %s", source, len(rows), fingerprint)
    return ChatDataset(source, tuple(rows), tuple(line_numbers), fingerprint)


def render_dataset(
    dataset: ChatDataset,
    renderer: ChatRenderer,
    train_on_what: TrainOnWhat = "all_assistant_messages",
    *,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> list[SupervisedExample]:
    """Render every row up front, so a row the template cannot render fails before compute.

    Rendering is deterministic (no RNG), so the examples equal a later render of the same rows.
    Raises `DatasetError` naming the line of each row that failed.
    """
    examples: list[SupervisedExample] = []
    problems: list[DatasetProblem] = []
    for row, line in zip(dataset.rows, dataset.line_numbers, strict=True):
        try:
            examples.append(
                renderer.build_supervised_example(row.messages, train_on_what, tools=row.tools)
            )
        except ChatTemplateError as exc:
            problems.append(DatasetProblem(dataset.source, line, "messages", str(exc)))
    if problems:
        raise DatasetError(problems[:max_problems], total=len(problems))
    return examples


def read_lines(handle: Any, digest: Any, max_line_bytes: int) -> Iterator[bytes | None]:
    """The raw lines of a binary file object (newline kept), every byte fed to `digest`.

    A line over `max_line_bytes` (without its newline) comes back as None and is dropped from
    memory as it is read: the reader holds at most one limit's worth plus one chunk.
    """
    pending = bytearray()
    oversized = False
    while chunk := handle.read(_READ_CHUNK_BYTES):
        digest.update(chunk)
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            if oversized or len(pending) + end - start > max_line_bytes:
                yield None
            else:
                yield bytes(pending) + chunk[start : end + 1]
            pending.clear()
            oversized = False
            start = end + 1
        if not oversized:
            pending += chunk[start:]
            if len(pending) > max_line_bytes:
                oversized = True
                pending.clear()
    if oversized:
        yield None
    elif pending:
        yield bytes(pending)


def _parse_row(
    source: str, line: int, raw: bytes, problems: list[DatasetProblem]
) -> ChatRow | None:
    """The row of one line, or None after appending its problems."""
    value = parse_json_object(source, line, raw, problems)
    if value is None:
        return None
    try:
        return ChatRow.model_validate(value)
    except RecursionError:
        problems.append(DatasetProblem(source, line, "(row)", "nested too deeply"))
        return None
    except ValidationError as exc:
        for error in exc.errors():
            field = field_path(error["loc"])
            problems.append(DatasetProblem(source, line, field, error_message(error)))
        return None


def parse_json_object(
    source: str, line: int, raw: bytes, problems: list[DatasetProblem]
) -> dict[str, Any] | None:
    """The JSON object of one line, or None after appending why it is not one."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problems.append(DatasetProblem(source, line, "(line)", f"not UTF-8: {exc.reason}"))
        return None
    except json.JSONDecodeError as exc:
        problems.append(DatasetProblem(source, line, "(line)", f"malformed JSON: {exc.msg}"))
        return None
    except RecursionError:
        problems.append(DatasetProblem(source, line, "(line)", "JSON nested too deeply"))
        return None
    if not isinstance(value, dict):
        kind = type(value).__name__
        problems.append(DatasetProblem(source, line, "(row)", f"expected an object, got {kind}"))
        return None
    return value


def field_path(loc: tuple[int | str, ...]) -> str:
    """`('messages', 2, 'role')` -> `messages[2].role`; the row itself -> `(row)`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(row)"


def error_message(error: Any) -> str:
    """Pydantic's message, shortened where a plainer one exists."""
    kind = error["type"]
    if kind == "missing":
        return "missing"
    if kind == "too_short" and tuple(error["loc"]) == ("messages",):
        return "empty conversation"
    message: str = error["msg"].removeprefix("Value error, ")
    if kind == "literal_error":  # an unknown role: say which
        message += f", got {error['input']!r}"
    return message


# -- data order and the cursor ----------------------------------------------------------------


@dataclass(frozen=True)
class CursorPosition:
    """Where a raw-row cursor points: `epoch = cursor // n_rows`, `offset = cursor % n_rows`."""

    epoch: int
    offset: int


def cursor_position(cursor: int, n_rows: int) -> CursorPosition:
    """The epoch and in-epoch offset of `cursor` raw rows consumed."""
    if n_rows <= 0 or cursor < 0:
        raise ValueError(f"need n_rows > 0 and cursor >= 0, got {n_rows=} {cursor=}")
    return CursorPosition(epoch=cursor // n_rows, offset=cursor % n_rows)


def epoch_order(seed: int, epoch: int, n_rows: int, *, shuffle: bool = True) -> list[int]:
    """Row indices of epoch `epoch`: a permutation drawn from `random.Random(seed + epoch)`.

    Pure: the same arguments always give the same order, and no global RNG is touched, so
    a resumed run sees exactly the order of an uninterrupted one. `shuffle=False` gives
    `0..n_rows-1`.
    """
    order = list(range(n_rows))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


def next_batch(
    seed: int,
    cursor: int,
    batch_size: int,
    n_rows: int,
    *,
    total_rows: int | None = None,
    shuffle: bool = True,
) -> tuple[list[int], int]:
    """The row indices of the batch starting at `cursor`, and the cursor after it.

    Rows are one stream, epoch after epoch, each in `epoch_order(seed, e, n_rows)`: a batch
    that reaches the end of an epoch continues in the next one, so resuming at an epoch
    boundary starts the next epoch instead of silently skipping it. `total_rows` (e.g.
    `epochs * n_rows`) ends the stream; the last batch may be short and an exhausted stream
    gives `[]`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    end = cursor + batch_size if total_rows is None else min(cursor + batch_size, total_rows)
    indices: list[int] = []
    position = cursor
    while position < end:
        at = cursor_position(position, n_rows)
        take = min(end - position, n_rows - at.offset)
        indices.extend(epoch_order(seed, at.epoch, n_rows, shuffle=shuffle)[at.offset :][:take])
        position += take
    return indices, max(cursor, end)


def total_steps(n_rows: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps over `epochs` passes of `n_rows` rows: ceil(n_rows · epochs / batch_size)."""
    return -(-n_rows * epochs // batch_size)
