"""Rewards: loading by name with clear errors, the call wrapper naming the row, the built-ins."""

from __future__ import annotations

import math
import pickle
import textwrap
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from algorithms.chat import ChatRenderer, ParsedResponse
from algorithms.rewards import (
    BUILTIN_REWARDS,
    Completion,
    RewardError,
    RewardLoadError,
    answer_integer_match,
    call_reward,
    exact_answer,
    extract_answer_integer,
    is_correct,
    load_reward,
)
from algorithms.rl_data import PromptRow, addition_prompt_rows
from backend.models.store import tokenizer_dir
from backend.models.tokenizers import EOS_TOKEN_ID

ROW = PromptRow.model_validate(
    {"messages": [{"role": "user", "content": "2+3="}], "ground_truth": "5", "tag": "t"}
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ChatRenderer:
    """The tiny model's own tokenizer, loaded from the directory the platform serves."""
    directory = tokenizer_dir("fireloop/tiny", tmp_path_factory.mktemp("models"))
    return ChatRenderer(AutoTokenizer.from_pretrained(directory), name="tiny")


def _sampled(renderer: ChatRenderer, text: str, *, stop: bool) -> ParsedResponse:
    """What parse_response reads from completion tokens as the sampler returns them."""
    tokens = renderer.tokenizer.encode(text, add_special_tokens=False)
    return renderer.parse_response([*tokens, EOS_TOKEN_ID] if stop else tokens)


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module of rewards, importable as `user_rewards`."""
    (tmp_path / "user_rewards.py").write_text(
        textwrap.dedent(
            """
            def length(completion_text, row):
                return float(len(completion_text))

            def needs_three(completion_text, row, extra):
                return 0.0

            NOT_A_FUNCTION = 3

            class Scorers:
                @staticmethod
                def tag(completion_text, row):
                    return 1.0 if row.model_extra["tag"] == "t" else 0.0
            """
        )
    )
    (tmp_path / "broken_rewards.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards"


# -- loading ------------------------------------------------------------------------------------


def test_builtins_load_by_name() -> None:
    assert load_reward("exact_answer") is exact_answer
    assert load_reward("answer_integer_match") is answer_integer_match
    assert set(BUILTIN_REWARDS) == {"exact_answer", "answer_integer_match"}


def test_a_user_function_loads_and_reads_extra_fields(plugins: str) -> None:
    assert load_reward(f"{plugins}:length")("abc", ROW) == 3.0
    assert load_reward(f"{plugins}:Scorers.tag")("", ROW) == 1.0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "exact",
            "not a built-in reward (answer_integer_match, exact_answer) nor 'module:function'",
        ),
        ("user_rewards:", "nor 'module:function'"),
        (
            "no_such_module_xyz:f",
            "module 'no_such_module_xyz' does not import: ModuleNotFoundError",
        ),
        ("broken_rewards:f", "module 'broken_rewards' does not import: ModuleNotFoundError"),
        ("user_rewards:missing", "module 'user_rewards' has no 'missing'"),
        ("user_rewards:NOT_A_FUNCTION", "not callable (a int)"),
        ("user_rewards:needs_three", "cannot be called as reward(completion_text, row)"),
    ],
)
def test_a_reward_that_cannot_be_used_is_refused_by_name(
    plugins: str, name: str, message: str
) -> None:
    with pytest.raises(RewardLoadError) as info:
        load_reward(name)
    assert str(info.value).startswith(f"reward {name!r}: ")
    assert message in str(info.value)
    assert info.value.retryable is False


# -- calling ------------------------------------------------------------------------------------


def _raises(completion_text: str, row: PromptRow) -> float:
    raise KeyError("answer")


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (_raises, "KeyError: 'answer'"),
        (lambda text, row: math.nan, "returned nan, not a finite number"),
        (lambda text, row: -math.inf, "returned -inf, not a finite number"),
        (lambda text, row: None, "returned NoneType None, not a number"),
        (lambda text, row: "1.0", "returned str '1.0', not a number"),
    ],
)
def test_a_failing_reward_names_the_row(reward: object, message: str) -> None:
    with pytest.raises(RewardError) as info:
        call_reward(reward, ParsedResponse("5", True), ROW, where="data.jsonl:7")  # type: ignore[arg-type]
    assert str(info.value) == f"reward failed on data.jsonl:7: {message}"
    copy = pickle.loads(pickle.dumps(info.value))  # Prefect pickles failures
    assert (copy.row, copy.message, str(copy)) == (info.value.row, message, str(info.value))


def test_a_good_reward_returns_a_float_and_sees_the_completion() -> None:
    seen: list[object] = []

    def reward(text: str, row: PromptRow) -> float:
        seen.append(text)
        return True  # type: ignore[return-value]  # a bool is a number: 1.0

    assert call_reward(reward, ParsedResponse("5", False), ROW, where="x:1") == 1.0
    [text] = seen
    assert isinstance(text, Completion) and text == "5" and text.stopped is False


def test_a_completion_is_text_that_keeps_its_stop_through_pickling() -> None:
    completion = Completion("5", True)
    assert completion == "5" and completion.upper() == "5" and completion.stopped
    copy = pickle.loads(pickle.dumps(completion))
    assert copy == "5" and copy.stopped is True and type(copy) is Completion


# -- the built-in rewards on the tiny model's tokens ----------------------------------------------


def test_exact_answer_needs_the_sum_then_a_clean_stop(tiny: ChatRenderer) -> None:
    def score(text: str, *, stop: bool) -> float:
        return call_reward(exact_answer, _sampled(tiny, text, stop=stop), ROW, where="x:1")

    assert score("5", stop=True) == 1.0
    assert score("6", stop=True) == 0.0
    assert score("5", stop=False) == 0.0  # cut by the token limit: no clean stop
    assert score("55", stop=True) == 0.0
    assert score("5 ", stop=True) == 0.0
    assert score("<answer>5</answer>", stop=True) == 0.0
    # A plain str carries no stop: the strict reading scores it 0.
    assert exact_answer("5", ROW) == 0.0


def test_exact_answer_after_a_stop_ignores_what_follows(tiny: ChatRenderer) -> None:
    tokens = [*b"5", EOS_TOKEN_ID, *b"junk"]
    assert call_reward(exact_answer, tiny.parse_response(tokens), ROW, where="x:1") == 1.0


def test_answer_integer_match_reads_the_answer_tag(tiny: ChatRenderer) -> None:
    def score(text: str, *, stop: bool = True, truth: str = "5") -> float:
        row = ROW.model_copy(update={"ground_truth": truth})
        return call_reward(answer_integer_match, _sampled(tiny, text, stop=stop), row, where="x:1")

    assert score("<answer>5</answer>") == 1.0
    assert score("think... <answer>the sum is 5, not 6</answer>") == 1.0
    assert score("<answer>5</answer>", stop=False) == 1.0  # the format reward has no stop rule
    assert score("<answer>6</answer>") == 0.0
    assert score("5") == 0.0  # no tag
    assert score("<answer>five</answer>") == 0.0
    assert score("<answer>5") == 0.0  # unterminated tag
    assert score("<answer>-5</answer>", truth="-5") == 1.0
    assert score("<answer>1,234</answer>", truth="#### <answer>1234</answer>") == 1.0
    assert score("<answer>7</answer><answer>5</answer>") == 0.0  # the first tag counts


def test_answer_integer_match_names_a_row_without_an_integer_truth() -> None:
    with pytest.raises(RewardError, match=r"on data\.jsonl:3: ValueError: ground_truth 'x'"):
        call_reward(
            answer_integer_match,
            ParsedResponse("<answer>1</answer>", True),
            ROW.model_copy(update={"ground_truth": "x"}),
            where="data.jsonl:3",
        )
    with pytest.raises(RewardError, match="the row has no ground_truth"):
        call_reward(
            exact_answer,
            ParsedResponse("5", True),
            ROW.model_copy(update={"ground_truth": None}),
            where="data.jsonl:4",
        )


def test_extract_answer_integer() -> None:
    assert extract_answer_integer("<answer>\n 42 \n</answer>") == 42
    assert extract_answer_integer("42") is None
    assert extract_answer_integer("42", require_tag=False) == 42
    assert extract_answer_integer("no number", require_tag=False) is None


def test_accuracy_counts_rewards_above_one_half() -> None:
    assert [is_correct(r) for r in (0.0, 0.5, 0.51, 1.0)] == [False, False, True, True]


def test_every_addition_prompt_is_solved_by_its_answer_and_only_by_it(tiny: ChatRenderer) -> None:
    reward = load_reward("exact_answer")
    for row in addition_prompt_rows(25, seed=0, split="train"):
        truth = row.ground_truth
        assert truth is not None
        right = call_reward(reward, _sampled(tiny, truth, stop=True), row, where="x:1")
        wrong = call_reward(reward, _sampled(tiny, truth + "0", stop=True), row, where="x:1")
        assert (right, wrong) == (1.0, 0.0)
