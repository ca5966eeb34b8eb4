"""The `reverse` toy task: seeded rows, disjoint splits, the measured format, exact match."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from algorithms.chat import ChatRenderer, ParsedResponse
from algorithms.datasets import validate_dataset, write_jsonl
from algorithms.toy_tasks import (
    TOY_TASKS,
    answer_of,
    exact_match,
    load_sft_dataset,
    prompt_of,
    reverse_is_eval_word,
    reverse_row,
    reverse_rows,
)
from backend.models.tokenizers import EOS_TOKEN_ID, build_byte_tokenizer


def _word(row_text: str) -> str:
    return row_text.removesuffix("=")


def test_rows_follow_the_task_definition() -> None:
    rows = reverse_rows(200, seed=0, split="train")
    for row in rows:
        user, assistant = row.messages
        assert user.role == "user" and assistant.role == "assistant"
        word = _word(user.content)
        assert re.fullmatch("[a-h]{2,5}", word)
        assert assistant.content == word[::-1]
    assert {len(_word(row.messages[0].content)) for row in rows} == {2, 3, 4, 5}


def test_rows_are_deterministic_per_seed() -> None:
    assert reverse_rows(50, seed=1, split="train") == reverse_rows(50, seed=1, split="train")
    assert reverse_rows(50, seed=1, split="train") != reverse_rows(50, seed=2, split="train")
    # A longer draw extends a shorter one: the first rows do not depend on n_rows.
    assert reverse_rows(80, seed=1, split="eval")[:30] == reverse_rows(30, seed=1, split="eval")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_eval_words_never_overlap(seed: int) -> None:
    train = {row.messages[0].content for row in reverse_rows(1000, seed=seed, split="train")}
    evals = {row.messages[0].content for row in reverse_rows(200, seed=seed, split="eval")}
    assert not train & evals
    assert all(reverse_is_eval_word(_word(text)) for text in evals)


def test_the_plain_template_renders_the_measured_bytes() -> None:
    renderer = ChatRenderer(build_byte_tokenizer("plain"), name="plain")
    example = renderer.build_supervised_example(reverse_row("abcd").messages)
    # The tiny model's byte tokenizer: one token per byte, then EOS.
    assert list(example.tokens) == [97, 98, 99, 100, 61, 100, 99, 98, 97, 258]
    assert renderer.build_generation_prompt(prompt_of(reverse_row("abcd"))) == list(b"abcd=")


def test_exact_match_needs_the_answer_and_the_eos() -> None:
    row = reverse_row("abcd")
    assert answer_of(row) == "dcba"
    assert exact_match(ParsedResponse("dcba", stopped=True), row) == 1.0
    assert exact_match(ParsedResponse("dcba", stopped=False), row) == 0.0  # ran out of tokens
    assert exact_match(ParsedResponse("dcb", stopped=True), row) == 0.0
    renderer = ChatRenderer(build_byte_tokenizer("plain"), name="plain")
    greedy = [*b"dcba", EOS_TOKEN_ID, *b"junk"]
    assert TOY_TASKS["reverse"].score(renderer.parse_response(greedy), row) == 1.0


def test_a_toy_dataset_and_its_jsonl_are_the_same_dataset(tmp_path: Path) -> None:
    task = TOY_TASKS["reverse"]
    in_memory = task.dataset("train", seed=3, n_rows=40)
    assert len(in_memory) == 40
    assert task.dataset("train", seed=3, n_rows=40).fingerprint == in_memory.fingerprint
    path = tmp_path / "reverse.jsonl"
    assert write_jsonl(in_memory.rows, path) == in_memory.fingerprint
    from_file = validate_dataset(path)
    assert from_file.rows == in_memory.rows
    assert from_file.fingerprint == in_memory.fingerprint
    assert load_sft_dataset(path).fingerprint == in_memory.fingerprint


def test_a_config_names_a_toy_task_or_a_file() -> None:
    named = load_sft_dataset("reverse", seed=0, max_rows=16)
    assert len(named) == 16
    assert named.source == "toy:reverse/train?seed=0&n=16"
    assert len(load_sft_dataset("reverse", split="eval")) == 64  # the default eval size
    assert TOY_TASKS["reverse"].metric == "eval/exact_match"
