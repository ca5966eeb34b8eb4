"""Preference pairs: the three accepted forms, every refused input by file/line/field, rendering.

Rendering uses the tiny model's own tokenizer (the byte tokenizer with its plain template, built
as the platform builds it), so `response_start` and the datum shift are checked on real ids.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from algorithms.chat import ChatMessage, ChatRenderer
from algorithms.datasets import DatasetError, DatasetProblem
from algorithms.preference import (
    PREFERENCE_TASKS,
    PreferenceDataset,
    PreferenceRow,
    RenderedPair,
    corrupt_reversal,
    load_preference_dataset,
    load_preference_source,
    pair_datums,
    pair_problem,
    parse_preference,
    render_pair,
    reverse_pair_rows,
    write_preference_jsonl,
)
from algorithms.toy_tasks import REVERSE_LETTERS, TOY_TASKS, reverse_is_eval_word, reverse_rows
from backend.models.tokenizers import CHAT_TEMPLATES, EOS_TOKEN_ID, build_byte_tokenizer
from fireloop.help import task_rows

USER = {"role": "user", "content": "abc="}
GOOD = {"role": "assistant", "content": "cba"}
BAD = {"role": "assistant", "content": "cab"}


def _msgs(*messages: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in messages]


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> ChatRenderer:
    """The tiny model's tokenizer (plain template), saved and reloaded as the platform serves it."""
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    build_byte_tokenizer("plain").save_pretrained(directory)
    return ChatRenderer(AutoTokenizer.from_pretrained(directory), name="fireloop/tiny")


def _write(tmp_path: Path, lines: list[Any]) -> Path:
    path = tmp_path / "pairs.jsonl"
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text)
    return path


def _problems(path: Path | str, **kwargs: Any) -> list[DatasetProblem]:
    with pytest.raises(DatasetError) as caught:
        load_preference_dataset(path, **kwargs)
    return list(caught.value.problems)


# -- the three forms ----------------------------------------------------------------------------


def test_form_1_chosen_and_rejected_conversations_or_text() -> None:
    row = parse_preference(
        {"chosen": {"messages": [USER, GOOD]}, "rejected": {"messages": [USER, BAD]}}
    )
    assert row == PreferenceRow(chosen=_msgs(USER, GOOD), rejected=_msgs(USER, BAD))
    text = parse_preference({"chosen": {"text": "abc=cba"}, "rejected": {"text": "abc=cab"}})
    assert (text.chosen, text.rejected) == ("abc=cba", "abc=cab")


@pytest.mark.parametrize("score_key", ["score", "evals"])
def test_form_2_scored_samples_in_either_order(score_key: str) -> None:
    def sample(reply: dict[str, str], score: float) -> dict[str, Any]:
        scored = {"score": score} if score_key == "score" else {"evals": {"score": score}}
        return {"messages": [USER, reply], **scored}

    row = parse_preference({"samples": [sample(BAD, 0.0), sample(GOOD, 1)]})
    assert row == PreferenceRow(chosen=_msgs(USER, GOOD), rejected=_msgs(USER, BAD))


def test_form_3_openai_input_is_the_shared_prompt() -> None:
    expected = PreferenceRow(chosen=_msgs(USER, GOOD), rejected=_msgs(USER, BAD))
    as_object = {
        "input": {"messages": [USER]},
        "preferred_output": [GOOD],
        "non_preferred_output": [BAD],
    }
    as_list = {"input": [USER], "preferred_output": "cba", "non_preferred_output": "cab"}
    as_string = {"input": "abc=", "preferred_output": [GOOD], "non_preferred_output": "cab"}
    for value in (as_object, as_list, as_string):
        assert parse_preference(value) == expected


def test_a_file_of_mixed_forms_round_trips_through_the_canonical_jsonl(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            {"chosen": {"messages": [USER, GOOD]}, "rejected": {"messages": [USER, BAD]}},
            "",
            {
                "samples": [
                    {"messages": [USER, GOOD], "score": 1.0},
                    {"messages": [USER, BAD], "score": 0.0},
                ]
            },
            {"input": "abc=", "preferred_output": "cba", "non_preferred_output": "cab"},
            {"chosen": {"text": "abc=cba"}, "rejected": {"text": "abc=cab"}},
        ],
    )
    dataset = load_preference_dataset(path)
    assert len(dataset) == 4 and dataset.line_numbers == (1, 3, 4, 5)
    assert dataset.rows[0] == dataset.rows[1] == dataset.rows[2]
    assert dataset.fingerprint.startswith("sha256:")
    assert load_preference_dataset(path, max_rows=2).rows == dataset.rows[:2]
    copy = tmp_path / "copy.jsonl"
    fingerprint = write_preference_jsonl(dataset.rows, copy)
    assert load_preference_dataset(copy).rows == dataset.rows
    assert PreferenceDataset.from_rows("mem", dataset.rows).fingerprint == fingerprint


# -- refused inputs -----------------------------------------------------------------------------


def _sides(chosen: Any, rejected: Any) -> dict[str, Any]:
    return {"chosen": chosen, "rejected": rejected}


def _conv(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


def _samples(*scores: dict[str, Any]) -> dict[str, Any]:
    """Sample 0 is the right reply scored 1.0; sample i > 0 the wrong one with `scores[i]`."""
    first = {"messages": [USER, GOOD], "score": 1.0}
    return {"samples": [first, *({"messages": [USER, BAD], **extra} for extra in scores)]}


def _openai(**outputs: Any) -> dict[str, Any]:
    return {"input": "abc=", **outputs}


PAIR = _sides(_conv(USER, GOOD), _conv(USER, BAD))
ROBOT = {"role": "robot", "content": "x"}
BAD_LINES: list[tuple[Any, str, str]] = [
    ("{not json", "(line)", "malformed JSON"),
    ({"prompt": "abc=", "answer": "cba"}, "(row)", "unknown preference form"),
    (_sides(_conv(), _conv(USER, BAD)), "chosen.messages", "no messages"),
    (_sides(_conv(USER), _conv(USER, BAD)), "chosen.messages", "no assistant content"),
    (_sides({"text": " "}, {"text": "x"}), "chosen.text", "empty text"),
    (_sides(_conv(USER, GOOD), _conv(USER, GOOD)), "rejected", "identical"),
    ({"chosen": _conv(USER, GOOD)}, "rejected", "missing"),
    (_sides(_conv(ROBOT), {"text": "x"}), "chosen.messages[0].role", "'robot'"),
    (_openai(preferred_output="cba", non_preferred_output=""), "non_preferred_output", "no assi"),
    (_openai(preferred_output="cba", non_preferred_output="cba"), "non_preferred_output", "ident"),
    (_openai(preferred_output="cba"), "non_preferred_output", "missing"),
    (_samples({"score": 0.5}), "samples[1].score", "graded score 0.5"),
    (_samples({"evals": {"score": 0.3}}), "samples[1].evals.score", "graded score 0.3"),
    (_samples({}), "samples[1].score", "missing"),
    (_samples({"score": 1.0}), "samples[1].score", "a second sample scored 1.0"),
    (_samples(), "samples", "two samples"),
    (_samples({"score": 0.0}, {"score": 0.0}), "samples", "two samples"),
    ({"samples": [PAIR["chosen"] | {"score": 1}] * 2}, "samples[1].score", "a second sample"),
    (
        {"samples": [{"messages": [USER, GOOD], "score": s} for s in (1, 0)]},
        "samples[1]",
        "identical",
    ),
]


@pytest.mark.parametrize(("line", "field", "message"), BAD_LINES)
def test_each_bad_pair_names_the_file_line_and_field(
    tmp_path: Path, line: Any, field: str, message: str
) -> None:
    path = _write(tmp_path, [PAIR, line, PAIR])
    with pytest.raises(DatasetError) as caught:
        load_preference_dataset(path)
    problem = caught.value.problems[0]
    assert (problem.source, problem.line, problem.field) == (str(path), 2, field)
    assert message in problem.message
    assert f"{path}:2: {field}: " in str(caught.value)


def test_every_line_is_checked_and_max_rows_counts_valid_pairs(tmp_path: Path) -> None:
    bad = {"chosen": {"text": ""}, "rejected": {"text": "x"}}
    path = _write(tmp_path, [bad, PAIR, bad, PAIR, PAIR])
    assert [p.line for p in _problems(path)] == [1, 3]
    assert [p.line for p in _problems(path, max_rows=2)] == [1, 3]  # both before the 2nd pair
    assert [p.line for p in _problems(path, max_rows=1)] == [1]  # later lines are not read


def test_a_long_line_is_refused_unparsed(tmp_path: Path) -> None:
    long = {"chosen": {"text": "x" * 5000}, "rejected": {"text": "y"}}
    path = _write(tmp_path, [PAIR, long])
    (problem,) = _problems(path, max_line_bytes=1000)
    assert (problem.line, problem.field) == (2, "(line)")
    assert "max_line_bytes" in problem.message


def test_a_missing_file_an_empty_file_and_an_sft_task_name(tmp_path: Path) -> None:
    (missing,) = _problems(tmp_path / "nope.jsonl")
    assert (missing.line, missing.field) == (0, "(file)") and "no such file" in missing.message
    (empty,) = _problems(_write(tmp_path, ["", ""]))
    assert (empty.line, empty.field, empty.message) == (0, "(file)", "no preference pairs")
    with pytest.raises(
        DatasetError, match="'reverse' is an SFT task; preference tasks: reverse_pairs"
    ):
        load_preference_source("reverse")


# -- rendering and datums -----------------------------------------------------------------------


def test_response_start_is_the_common_token_prefix(renderer: ChatRenderer) -> None:
    pair = render_pair(PreferenceRow(chosen=_msgs(USER, GOOD), rejected=_msgs(USER, BAD)), renderer)
    assert pair.chosen == (*b"abc=cba", EOS_TOKEN_ID)  # the SFT render of the same conversation
    assert pair.chosen == renderer.build_supervised_example(_msgs(USER, GOOD)).tokens
    assert pair.rejected == (*b"abc=cab", EOS_TOKEN_ID)
    assert pair.response_start == 5  # "abc=c" is shared; the sides differ at token 5
    assert pair_problem(pair) is None


def test_datums_shift_and_weigh_from_the_target_before_the_first_differing_token(
    renderer: ChatRenderer,
) -> None:
    pair = render_pair(PreferenceRow(chosen=_msgs(USER, GOOD), rejected=_msgs(USER, BAD)), renderer)
    chosen, rejected = pair_datums(pair)
    for datum, tokens in ((chosen, pair.chosen), (rejected, pair.rejected)):
        assert datum.model_input.to_ints() == list(tokens[:-1])
        assert datum.loss_fn_inputs["target_tokens"].tolist() == list(tokens[1:])
        # Target 4 predicts token 5, the first one where the sides differ.
        assert datum.loss_fn_inputs["weights"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert pair.chosen[:5] == pair.rejected[:5] and pair.chosen[5] != pair.rejected[5]


def test_text_sides_are_tokenized_raw_and_may_share_no_prefix(renderer: ChatRenderer) -> None:
    pair = render_pair(PreferenceRow(chosen="xyz", rejected="abc"), renderer)
    assert (pair.chosen, pair.rejected, pair.response_start) == (tuple(b"xyz"), tuple(b"abc"), 0)
    chosen, _ = pair_datums(pair)
    assert chosen.loss_fn_inputs["weights"].tolist() == [1, 1]  # k = 0: every target counts
    shared = render_pair(PreferenceRow(chosen="ab=cd", rejected="ab=ce"), renderer)
    assert shared.response_start == 4
    assert pair_datums(shared)[1].loss_fn_inputs["weights"].tolist() == [0, 0, 0, 1]


def _bos_renderer(*, tokenizer_adds_bos: bool) -> ChatRenderer:
    """The byte tokenizer with BOS = id 257 leading every chat render, as Llama's template does."""
    tokenizer = build_byte_tokenizer("plain")
    tokenizer.bos_token = "<|im_start|>"
    if tokenizer_adds_bos:
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 257)]
        )
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATES["plain"]
    return ChatRenderer(tokenizer, name="bos")


def test_a_text_side_starts_with_bos_when_tokenizer_and_template_both_do() -> None:
    llama_like = _bos_renderer(tokenizer_adds_bos=True)
    pair = render_pair(PreferenceRow(chosen="abc=cba", rejected=_msgs(USER, BAD)), llama_like)
    assert pair.chosen == (257, *b"abc=cba")
    assert pair.rejected == (257, *b"abc=cab", EOS_TOKEN_ID)
    assert pair.response_start == 6
    # A BOS id the tokenizer never puts before text is a turn marker there (SmolLM2): not added.
    turn_marker = _bos_renderer(tokenizer_adds_bos=False)
    assert render_pair(PreferenceRow(chosen="ab", rejected="ac"), turn_marker).chosen == (97, 98)


def test_pairs_that_cannot_train_are_named(renderer: ChatRenderer) -> None:
    assert pair_problem(RenderedPair((1, 2, 3), (1, 2, 3), 3)) == (
        "chosen and rejected render to identical tokens"
    )
    prefix = render_pair(PreferenceRow(chosen="abc", rejected="abcd"), renderer)
    assert prefix.response_start == 3
    assert "chosen side has no token after the common prefix" in str(pair_problem(prefix))
    with pytest.raises(ValueError, match="no token after the common prefix"):
        pair_datums(prefix)
    assert "fewer than 2 tokens" in str(pair_problem(RenderedPair((5,), (6, 7), 0)))
    long = render_pair(PreferenceRow(chosen="abcdef", rejected="abcxyz"), renderer)
    assert "6 tokens, over the limit of 5" in str(pair_problem(long, max_tokens=5))


# -- the reverse_pairs toy task -----------------------------------------------------------------


def test_reverse_pairs_prefer_the_right_reversal_over_a_near_miss() -> None:
    rows = reverse_pair_rows(300, seed=0, split="train")
    words = [row.messages[0].content for row in reverse_rows(300, seed=0, split="train")]
    kinds = set()
    for row, prompt in zip(rows, words, strict=True):
        assert isinstance(row.chosen, list) and isinstance(row.rejected, list)
        assert row.chosen[0] == row.rejected[0] and row.chosen[0].content == prompt
        right, wrong = row.chosen[1].content, row.rejected[1].content
        assert right == prompt.removesuffix("=")[::-1] and wrong != right
        assert len(wrong) == len(right) and re.fullmatch(f"[{REVERSE_LETTERS}]+", wrong)
        differ = [i for i, (a, b) in enumerate(zip(right, wrong, strict=True)) if a != b]
        swapped = len(differ) == 2 and sorted(wrong) == sorted(right)
        assert len(differ) == 1 or swapped
        kinds.add("swap" if swapped else "replace")
    assert kinds == {"swap", "replace"}


def test_corruption_never_returns_the_answer() -> None:
    rng = random.Random(0)
    for word in ("aa", "ab", "aaaa", "abcde"):
        assert all(corrupt_reversal(word, rng) != word for _ in range(200))


@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_pairs_splits_are_the_reverse_splits(seed: int) -> None:
    def prompts(split: Any, n: int) -> set[str]:
        rows = reverse_pair_rows(n, seed=seed, split=split)
        return {row.chosen[0].content for row in rows if isinstance(row.chosen, list)}

    train, evals = prompts("train", 500), prompts("eval", 100)
    assert not train & evals
    assert all(reverse_is_eval_word(p.removesuffix("=")) for p in evals)
    assert reverse_pair_rows(40, seed=seed, split="train") == reverse_pair_rows(
        40, seed=seed, split="train"
    )
    assert reverse_pair_rows(40, seed=seed, split="train") != reverse_pair_rows(
        40, seed=seed + 7, split="train"
    )


def test_reverse_pairs_is_a_named_source_listed_with_its_metric(tmp_path: Path) -> None:
    task = PREFERENCE_TASKS["reverse_pairs"]
    assert (task.metric, task.default_rows) == ("eval/accuracy", {"train": 1024, "eval": 64})
    assert len(load_preference_source("reverse_pairs")) == 1024
    named = load_preference_source("reverse_pairs", split="eval", seed=2, max_rows=16)
    assert len(named) == 16 and named.source == "toy:reverse_pairs/eval?seed=2&n=16"
    path = tmp_path / "pairs.jsonl"
    assert write_preference_jsonl(named.rows, path) == named.fingerprint
    from_file = load_preference_source(path)
    assert (from_file.rows, from_file.fingerprint) == (named.rows, named.fingerprint)
    listed = {row[0]: row for row in task_rows()}
    assert listed["reverse_pairs"][3] == "eval/accuracy"
    assert re.search(
        r"user: '[a-h]+='  chosen: '[a-h]+'  rejected: '[a-h]+'", listed["reverse_pairs"][2]
    )
    assert "reverse_pairs" not in TOY_TASKS  # SFT's tasks stay chat tasks


def test_a_pair_built_in_code_is_held_to_the_same_rules() -> None:
    with pytest.raises(ValueError, match=r"samples\[1\]\.score: graded score 0.5"):
        parse_preference(_samples({"score": 0.5}))
    with pytest.raises(ValueError, match="chosen and rejected are identical"):
        PreferenceRow(chosen="abc", rejected="abc")
    with pytest.raises(ValueError, match="rejected: no assistant content"):
        PreferenceRow(chosen=_msgs(USER, GOOD), rejected=_msgs(USER))
