"""SFT JSONL validation (file, line, field), the fingerprint, the epoch order and the cursor."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import uuid
from pathlib import Path

import fsspec
import pytest

from algorithms.chat import ChatRenderer
from algorithms.datasets import (
    CursorPosition,
    DatasetError,
    cursor_position,
    epoch_order,
    next_batch,
    render_dataset,
    total_steps,
    validate_dataset,
)
from backend.models.tokenizers import EOS_TOKEN_ID, build_byte_tokenizer

GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "ab="}, {"role": "assistant", "content": "ba"}]}
)


def _row(*messages: dict[str, object]) -> str:
    return json.dumps({"messages": list(messages)})


USER = {"role": "user", "content": "ab="}
ASSISTANT = {"role": "assistant", "content": "ba"}

# (bad line, field named in the error, words of the message); the bad line is line 2.
MALFORMED: list[tuple[str, str, str]] = [
    ('{"messages": [', "(line)", "malformed JSON"),
    ("[1, 2]", "(row)", "expected an object, got list"),
    (json.dumps({"msgs": []}), "messages", "missing"),
    (json.dumps({"messages": []}), "messages", "empty conversation"),
    (json.dumps({"messages": "hi"}), "messages", "valid list"),
    (_row(USER, {"content": "ba"}), "messages[1].role", "missing"),
    (_row({"role": "user"}, ASSISTANT), "messages[0].content", "missing"),
    (_row({"role": "robot", "content": "x"}, ASSISTANT), "messages[0].role", "got 'robot'"),
    (_row(USER), "messages", "no assistant message to train on"),
    (_row({"role": "user", "content": 3}, ASSISTANT), "messages[0].content", "valid string"),
    (
        _row(USER, {"role": "assistant", "content": [{"type": "image"}]}),
        "messages[1].content",
        "part 0",
    ),
    (_row(USER, {**ASSISTANT, "weight": 0.5}), "messages[1].weight", "must be 0 or 1"),
    (_row(USER, {**ASSISTANT, "weight": 0}), "messages", "no message is marked trainable"),
    (_row("not a message", ASSISTANT), "messages[0]", "valid dictionary"),
]


def _write(tmp_path: Path, *lines: str, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(("bad", "field", "words"), MALFORMED)
def test_a_malformed_row_names_file_line_and_field(
    tmp_path: Path, bad: str, field: str, words: str
) -> None:
    path = _write(tmp_path, GOOD, bad, GOOD)
    with pytest.raises(DatasetError) as caught:
        validate_dataset(path)
    message = str(caught.value)
    assert f"{path}:2: {field}: " in message
    assert words in message
    assert caught.value.problems[0].line == 2
    assert caught.value.problems[0].field == field


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"bytes.jsonl:2: \(line\): not UTF-8"):
        validate_dataset(path)


def test_every_problem_is_collected_before_failing_and_capped(tmp_path: Path) -> None:
    path = _write(tmp_path, *(["[]"] * 5), GOOD, '{"messages": [')
    with pytest.raises(DatasetError) as caught:
        validate_dataset(path, max_problems=3)
    error = caught.value
    assert error.total == 6
    assert [p.line for p in error.problems] == [1, 2, 3]
    assert "... and 3 more problems" in str(error)
    # Prefect pickles failures: the copy keeps the structured problems.
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and str(copy) == str(error)


def test_an_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"empty.jsonl:0: \(file\): no rows"):
        validate_dataset(_write(tmp_path, name="empty.jsonl"))


def test_rows_keep_their_line_numbers_and_the_fingerprint_covers_every_byte(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, GOOD, "", "  ", GOOD, GOOD)
    dataset = validate_dataset(path)
    assert len(dataset) == 3
    assert dataset.line_numbers == (1, 4, 5)  # blank lines skipped, not renumbered
    assert dataset.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    capped = validate_dataset(path, max_rows=2)
    assert capped.line_numbers == (1, 4)
    assert capped.fingerprint == dataset.fingerprint
    path.write_bytes(path.read_bytes().replace(b"ba", b"bb", 1))
    assert validate_dataset(path).fingerprint != dataset.fingerprint


def test_rows_after_max_rows_are_not_validated(tmp_path: Path) -> None:
    assert len(validate_dataset(_write(tmp_path, GOOD, "[]"), max_rows=1)) == 1


def test_a_fsspec_url_reads_like_a_file() -> None:
    url = f"memory://datasets/{uuid.uuid4().hex}/train.jsonl"
    with fsspec.open(url, "wb") as handle:
        handle.write((GOOD + "\n").encode())
    assert validate_dataset(url).rows[0].messages[1].content == "ba"
    with fsspec.open(url, "wb") as handle:
        handle.write(b"[]\n")
    with pytest.raises(DatasetError, match=r"memory://datasets/.*train.jsonl:1: \(row\)"):
        validate_dataset(url)


# -- order and cursor -------------------------------------------------------------------------


def test_epoch_order_is_the_seeded_permutation_of_the_spec() -> None:
    state = random.getstate()
    order = epoch_order(seed=3, epoch=2, n_rows=10)
    expected = list(range(10))
    random.Random(5).shuffle(expected)  # the order is random.Random(seed + epoch)
    assert order == expected
    assert sorted(order) == list(range(10))
    assert epoch_order(3, 2, 10) == order  # pure: recomputed, never replayed
    assert epoch_order(3, 3, 10) != order
    assert epoch_order(3, 2, 10, shuffle=False) == list(range(10))
    assert random.getstate() == state  # no global RNG consumed


def test_cursor_position() -> None:
    assert cursor_position(0, 4) == CursorPosition(epoch=0, offset=0)
    assert cursor_position(10, 4) == CursorPosition(epoch=2, offset=2)
    assert cursor_position(8, 4) == CursorPosition(epoch=2, offset=0)
    with pytest.raises(ValueError, match="n_rows > 0"):
        cursor_position(1, 0)


def test_batches_cross_epoch_boundaries_as_one_stream() -> None:
    n, seed = 5, 7
    stream = [*epoch_order(seed, 0, n), *epoch_order(seed, 1, n), *epoch_order(seed, 2, n)]
    batches, cursor = [], 0
    while cursor < 3 * n:
        batch, cursor = next_batch(seed, cursor, 4, n, total_rows=3 * n)
        batches.append(batch)
    assert [len(b) for b in batches] == [4, 4, 4, 3]  # the last batch is short
    assert [i for b in batches for i in b] == stream
    assert batches[1] == [*epoch_order(seed, 0, n)[4:], *epoch_order(seed, 1, n)[:3]]
    assert next_batch(seed, 3 * n, 4, n, total_rows=3 * n) == ([], 3 * n)


def test_resume_at_an_epoch_boundary_starts_the_next_epoch() -> None:
    """A cursor of exactly one epoch continues with epoch 1, it does not end the run."""
    batch, cursor = next_batch(seed=0, cursor=6, batch_size=3, n_rows=6, total_rows=18)
    assert batch == epoch_order(0, 1, 6)[:3]
    assert cursor == 9


def test_resumed_batches_equal_the_uninterrupted_ones() -> None:
    """Resuming from any cursor continues the same index sequence."""
    straight, cursor = [], 0
    for _ in range(6):
        batch, cursor = next_batch(11, cursor, 3, 7)
        straight.append(batch)
    resumed_cursor = 3 * 3  # a checkpoint after three batches
    resumed = []
    for _ in range(3):
        batch, resumed_cursor = next_batch(11, resumed_cursor, 3, 7)
        resumed.append(batch)
    assert resumed == straight[3:]


def test_total_steps() -> None:
    assert total_steps(n_rows=10, epochs=3, batch_size=4) == 8
    assert total_steps(n_rows=8, epochs=1, batch_size=4) == 2


def test_rows_the_template_cannot_render_fail_before_compute(tmp_path: Path) -> None:
    renderer = ChatRenderer(build_byte_tokenizer("plain"), name="plain")
    tool_row = _row({"role": "tool", "content": "x"}, ASSISTANT)
    dataset = validate_dataset(_write(tmp_path, GOOD, tool_row))
    with pytest.raises(DatasetError, match=r"train.jsonl:2: messages: chat template of 'plain'"):
        render_dataset(dataset, renderer)
    (example,) = render_dataset(validate_dataset(_write(tmp_path, GOOD)), renderer)
    assert example.tokens == (*b"ab=ba", EOS_TOKEN_ID)


# -- the line-size limit --------------------------------------------------------------------


def _padded(length: int) -> str:
    """A valid row of exactly `length` bytes (without its newline)."""
    row = _row(USER, {"role": "assistant", "content": ""})
    pad = length - len(row)
    assert pad >= 0
    return _row(USER, {"role": "assistant", "content": "x" * pad})


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_lines_at_and_over_the_limit_across_read_chunks(
    tmp_path: Path, trailing_newline: bool
) -> None:
    limit = 100_000  # above the 64 KiB read chunk, so lines straddle chunk boundaries
    lengths = [limit, limit + 1, 70_000, 5 * limit, limit - 1, limit + 1]
    lines = [_padded(n) for n in lengths]
    data = ("\n".join(lines) + ("\n" if trailing_newline else "")).encode()
    path = tmp_path / "sizes.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as raised:
        validate_dataset(path, max_line_bytes=limit)
    over = [line for line, n in enumerate(lengths, start=1) if n > limit]
    assert [problem.line for problem in raised.value.problems] == over
    assert all(
        "longer than max_line_bytes (100000 bytes)" in p.message for p in raised.value.problems
    )
    kept = [line for line in lines if len(line) <= limit]
    path.write_bytes(("\n".join(kept) + ("\n" if trailing_newline else "")).encode())
    dataset = validate_dataset(path, max_line_bytes=limit)
    assert dataset.line_numbers == tuple(range(1, len(kept) + 1))
    assert dataset.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_deeply_nested_line_is_named_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text(GOOD + "\n" + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"deep\.jsonl:2: \(line\): JSON nested too deeply"):
        validate_dataset(path)
