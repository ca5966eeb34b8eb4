"""RL prompts: the JSONL reader's errors by file:line:field, seeds, rendering, the addition task."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from algorithms.addition import addition_pairs
from algorithms.chat import ChatRenderer
from algorithms.datasets import DatasetError
from algorithms.rewards import BUILTIN_REWARDS
from algorithms.rl_data import (
    RL_TASKS,
    PromptDataset,
    PromptRow,
    addition_prompt_rows,
    load_prompt_dataset,
    load_prompt_source,
    render_prompt,
    render_prompts,
    sample_seed,
)
from algorithms.toy_tasks import TOY_TASKS, load_sft_dataset
from backend.models.store import tokenizer_dir
from backend.models.tokenizers import EOS_TOKEN_ID, build_byte_tokenizer
from fireloop.help import task_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ChatRenderer:
    """The tiny model's own tokenizer, loaded from the directory the platform serves."""
    directory = tokenizer_dir("fireloop/tiny", tmp_path_factory.mktemp("models"))
    return ChatRenderer(AutoTokenizer.from_pretrained(directory), name="tiny")


def _write(tmp_path: Path, lines: list[Any]) -> Path:
    path = tmp_path / "prompts.jsonl"
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def _problems(path: Path, **kwargs: Any) -> list[tuple[int, str, str]]:
    with pytest.raises(DatasetError) as info:
        load_prompt_dataset(path, **kwargs)
    assert all(problem.source == str(path) for problem in info.value.problems)
    return [(p.line, p.field, p.message) for p in info.value.problems]


USER = {"role": "user", "content": "2+3="}


# -- reading a file -----------------------------------------------------------------------------


def test_a_valid_file_keeps_extras_lines_and_its_fingerprint(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {"messages": [USER], "ground_truth": "5", "difficulty": "easy"},
            "",
            {"messages": [USER], "ground_truth": 5},
            {"messages": [{"role": "system", "content": "be brief"}, USER]},
        ],
    )
    dataset = load_prompt_dataset(path)
    assert dataset.line_numbers == (1, 3, 4)
    assert dataset.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    first, second, third = dataset.rows
    assert first.model_extra == {"difficulty": "easy"}
    assert second.ground_truth == "5"  # a numeric ground truth reads as its text
    assert third.ground_truth is None
    assert dataset.where(1) == f"{path}:3"


def test_trailing_assistant_messages_are_cut_and_history_kept() -> None:
    row = PromptRow.model_validate(
        {
            "messages": [
                {"role": "user", "content": "1+1="},
                {"role": "assistant", "content": "2"},
                USER,
                {"role": "assistant", "content": "5"},
                {"role": "assistant", "content": "five"},
            ]
        }
    )
    assert [(m.role, m.content) for m in row.prompt] == [
        ("user", "1+1="),
        ("assistant", "2"),
        ("user", "2+3="),
    ]
    assert len(row.messages) == 5  # the row itself is kept whole for the reward


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"messages": [', "(line)", "malformed JSON"),
        ("[1, 2]", "(row)", "expected an object, got list"),
        ({"ground_truth": "5"}, "messages", "missing"),
        ({"messages": []}, "messages", "empty conversation"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages", "no user message"),
        ({"messages": [{"role": "assistant", "content": "5"}]}, "messages", "every message is"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'robot'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": [USER], "ground_truth": ["5"]}, "ground_truth", "string"),
    ],
)
def test_each_bad_line_is_named_by_line_and_field(
    tmp_path: Path, line: Any, field: str, message: str
) -> None:
    path = _write(tmp_path, [{"messages": [USER]}, line])
    [(number, named, text)] = _problems(path)
    assert (number, named) == (2, field)
    assert message in text


def test_every_bad_line_is_reported_not_just_the_first(tmp_path: Path) -> None:
    path = _write(tmp_path, ["{", {"messages": [USER]}, {"messages": []}, "nope"])
    assert [line for line, _, _ in _problems(path)] == [1, 3, 4]


def test_an_oversized_line_is_refused_unparsed(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"messages": [USER]}, {"messages": [USER], "pad": "x" * 500}])
    [(line, field, message)] = _problems(path, max_line_bytes=200)
    assert (line, field) == (2, "(line)") and "max_line_bytes" in message


def test_the_file_as_a_whole(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert _problems(empty) == [(0, "(file)", "no prompts")]
    [(_, _, missing)] = _problems(tmp_path / "absent.jsonl")
    assert "no such file" in missing and "addition" in missing
    [(_, _, directory)] = _problems(tmp_path)
    assert "directory" in directory
    [(_, _, sft_task)] = _problems(Path("reverse"))
    assert "SFT task" in sft_task


def test_max_rows_keeps_the_first_rows_and_hashes_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"messages": [USER]}] * 3 + ["{ not json"])
    dataset = load_prompt_dataset(path, max_rows=2)
    assert len(dataset) == 2
    assert dataset.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_in_memory_dataset_is_fingerprinted_as_its_jsonl(tmp_path: Path) -> None:
    rows = addition_prompt_rows(6, seed=3, split="train")
    dataset = PromptDataset.from_rows("mem", rows)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows))
    assert load_prompt_dataset(path).fingerprint == dataset.fingerprint
    assert load_prompt_dataset(path).rows == dataset.rows


def test_a_source_is_a_task_name_or_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"messages": [USER], "ground_truth": "5"}])
    from_file = load_prompt_source(str(path), split="eval", seed=9)  # split/seed: tasks only
    assert from_file.source == str(path) and from_file.rows[0].ground_truth == "5"
    assert load_prompt_source("addition").source == "toy:addition/train?seed=0&n=20"


# -- seeds --------------------------------------------------------------------------------------


def test_sample_seed_is_a_fixed_function_of_its_arguments() -> None:
    # Pinned: a change here would silently change every recorded run's samples.
    assert sample_seed(0, 0, 0) == 8387133978117270309
    assert sample_seed(42, 7, 3) == 2361648591249717509


def test_sample_seed_is_the_same_in_another_process_with_another_hash_salt() -> None:
    code = "from algorithms.rl_data import sample_seed; print(sample_seed(42, 7, 3))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout) == sample_seed(42, 7, 3)


def test_sample_seeds_are_distinct_and_spread() -> None:
    seeds = [sample_seed(s, r, g) for s in range(3) for r in range(100) for g in range(8)]
    assert len(set(seeds)) == len(seeds)  # no two (seed, row, sample) share a stream
    assert all(0 <= seed < 2**63 for seed in seeds)
    # Neighbouring arguments are far apart: each of the top 4 bits is set about half the time.
    for bit in range(59, 63):
        share = sum(seed >> bit & 1 for seed in seeds) / len(seeds)
        assert 0.45 < share < 0.55, (bit, share)
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1) != sample_seed(1, 0, 0)


# -- rendering ----------------------------------------------------------------------------------


def test_a_prompt_renders_to_the_tiny_models_bytes(tiny: ChatRenderer) -> None:
    row = PromptRow(messages=[USER, {"role": "assistant", "content": "5"}])  # type: ignore[list-item]
    assert render_prompt(row, tiny) == list(b"2+3=")


def test_a_multi_turn_prompt_keeps_its_history() -> None:
    chatml = ChatRenderer(build_byte_tokenizer("chatml"), name="chatml")
    row = PromptRow.model_validate(
        {
            "messages": [
                {"role": "user", "content": "1+1="},
                {"role": "assistant", "content": "2"},
                USER,
            ]
        }
    )
    text = chatml.tokenizer.decode(render_prompt(row, chatml))
    assert text == (
        "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_prompt_over_the_context_is_named_by_file_and_line(
    tmp_path: Path, tiny: ChatRenderer
) -> None:
    long = {"role": "user", "content": "9" * 200 + "="}
    path = _write(tmp_path, [{"messages": [USER]}, {"messages": [long]}])
    dataset = load_prompt_dataset(path)
    assert render_prompts(dataset, tiny, max_completion_tokens=16, context_length=256)[0] == list(
        b"2+3="
    )
    with pytest.raises(DatasetError) as info:
        render_prompts(dataset, tiny, max_completion_tokens=64, context_length=256)
    [problem] = info.value.problems
    assert (problem.source, problem.line, problem.field) == (str(path), 2, "messages")
    assert "201 tokens + max_completion_tokens 64 exceeds the context of 256" in problem.message
    assert f"{path}:2: messages:" in str(info.value)


def test_a_prompt_the_template_cannot_render_is_named() -> None:
    row = PromptRow.model_validate({"messages": [USER, {"role": "tool", "content": "x"}]})
    plain = ChatRenderer(build_byte_tokenizer("plain"), name="plain")
    with pytest.raises(DatasetError) as info:
        render_prompts(
            PromptDataset.from_rows("mem", [row]), plain, max_completion_tokens=1, context_length=99
        )
    assert info.value.problems[0].line == 1 and "unknown role" in info.value.problems[0].message


# -- the addition task --------------------------------------------------------------------------


def test_addition_splits_are_fixed_disjoint_and_cover_every_problem() -> None:
    train, held_out = addition_pairs("train"), addition_pairs("eval")
    assert len(train) == 20 and len(held_out) == 5
    assert set(train) | set(held_out) == {(a, b) for a in range(5) for b in range(5)}
    assert not set(train) & set(held_out)
    for a, b in held_out:  # its mirror, same answer, is trained
        assert a < b and (b, a) in train
    for seed in range(5):
        rows = addition_prompt_rows(40, seed=seed, split="eval")
        assert {row.messages[0].content for row in rows} == {f"{a}+{b}=" for a, b in held_out}


def test_addition_rows_are_balanced_seeded_passes() -> None:
    rows = addition_prompt_rows(40, seed=1, split="train")
    assert Counter(row.messages[0].content for row in rows) == Counter(
        {f"{a}+{b}=": 2 for a, b in addition_pairs("train")}
    )
    assert rows[:20] != rows[20:]  # each pass is its own permutation
    assert addition_prompt_rows(40, seed=1, split="train") == rows
    assert addition_prompt_rows(40, seed=2, split="train") != rows
    assert addition_prompt_rows(7, seed=1, split="train") == rows[:7]


def test_addition_serves_rl_prompts_and_sft_rows_of_the_same_problems(tiny: ChatRenderer) -> None:
    prompts = load_prompt_source("addition", seed=4, max_rows=30)
    chats = load_sft_dataset("addition", seed=4, max_rows=30)
    assert len(prompts) == len(chats) == 30
    for prompt, chat in zip(prompts.rows, chats.rows, strict=True):
        user, answer = chat.messages
        a, b = (int(x) for x in user.content.removesuffix("=").split("+"))
        assert prompt.prompt == [user]
        assert prompt.ground_truth == answer.content == str(a + b)
    # Both defaults: RL one pass over the 20 problems, SFT ten passes; eval the 5 held out.
    assert len(load_prompt_source("addition")) == 20
    assert len(load_prompt_source("addition", split="eval")) == 5
    assert len(load_sft_dataset("addition")) == 200
    # The SFT row renders as "a+b=" + sum + EOS, trained on the answer and EOS only.
    example = tiny.build_supervised_example(chats.rows[0].messages)
    text = chats.rows[0].messages[0].content + chats.rows[0].messages[1].content
    assert list(example.tokens) == [*text.encode(), EOS_TOKEN_ID]
    assert example.weights[-2:] == (1.0, 1.0) and sum(example.weights) == 2.0


def test_addition_is_registered_for_sft_and_rl() -> None:
    assert "addition" in TOY_TASKS and "addition" in RL_TASKS
    for task in RL_TASKS.values():
        assert task.reward in BUILTIN_REWARDS
    listed = {row[0]: row for row in task_rows()}
    # `fireloop tasks` names the recipes that take each task: `run rl` takes addition.
    assert listed["addition"][4] == "sft, rl"
    assert listed["reverse"][4] == "sft"
