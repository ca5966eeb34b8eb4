"""Rewards for RL: the plug-in interface, loading one by name, calling it safely, built-ins.

A reward is `reward(completion_text, row) -> float`, named in a config as a built-in name or
`"module:function"`; a name that cannot be loaded fails when the config is read, not at the first
step. A reward that raises or returns something that is not a finite number fails the step with
the row named, before anything trains on it. Accuracy counts rewards above 0.5.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

from algorithms.chat import ParsedResponse
from algorithms.rl_data import PromptRow

__all__ = [
    "ACCURACY_THRESHOLD",
    "BUILTIN_REWARDS",
    "Completion",
    "Reward",
    "RewardError",
    "RewardLoadError",
    "answer_integer_match",
    "call_reward",
    "exact_answer",
    "extract_answer_integer",
    "is_clean_stop",
    "is_correct",
    "load_reward",
]

Reward = Callable[[str, PromptRow], float]

ACCURACY_THRESHOLD: Final = 0.5

_ANSWER_TAG: Final = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INTEGER: Final = re.compile(r"-?\d+(?:,\d{3})*")  # thousands separators are part of the number


class Completion(str):
    """A completion's text up to its first stop token, which also says whether one ended it.

    Rewards receive this as their `completion_text`: it is a `str`, so any reward can treat it
    as text, and one that cares about a clean stop reads `stopped` (`is_clean_stop`). A
    completion cut by the token limit has `stopped=False`.
    """

    stopped: bool

    def __new__(cls, text: str, stopped: bool) -> Completion:
        completion = super().__new__(cls, text)
        completion.stopped = stopped
        return completion

    @classmethod
    def from_parsed(cls, parsed: ParsedResponse) -> Completion:
        """The completion `ChatRenderer.parse_response` read from the sampled tokens."""
        return cls(parsed.text, parsed.stopped)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rewards may run in other processes; keep the flag through pickling.
        return (type(self), (str(self), self.stopped))

    def __repr__(self) -> str:
        return f"Completion({str(self)!r}, stopped={self.stopped})"


def is_clean_stop(completion: str) -> bool:
    """Whether a stop token ended the completion; a plain `str` carries no stop, so False."""
    return isinstance(completion, Completion) and completion.stopped


def is_correct(reward: float) -> bool:
    """The accuracy rule: a reward above 0.5 counts as a correct completion."""
    return reward > ACCURACY_THRESHOLD


# -- errors ------------------------------------------------------------------------------------


class RewardLoadError(ValueError):
    """A reward named in a config cannot be used (bad name, import failure, not callable)."""

    retryable: ClassVar[bool] = False


class RewardError(ValueError):
    """A reward failed on one row (raised, or returned a non-finite or non-numeric value)."""

    retryable: ClassVar[bool] = False

    def __init__(self, row: str, message: str) -> None:
        self.row = row
        self.message = message
        super().__init__(f"reward failed on {row}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles failures; rebuild from the parts, not from the formatted message.
        return (type(self), (self.row, self.message))


# -- built-ins ---------------------------------------------------------------------------------


def extract_answer_integer(text: str, *, require_tag: bool = True) -> int | None:
    """The first integer inside the first `<answer>...</answer>`, or None.

    With `require_tag=False` text without the tag is searched whole (a plain ground truth
    such as `"42"`). `"1,234"` reads as 1234.
    """
    match = _ANSWER_TAG.search(text)
    if match is None and require_tag:
        return None
    span = match.group(1) if match is not None else text
    number = _INTEGER.search(span)
    return None if number is None else int(number.group().replace(",", ""))


def answer_integer_match(completion_text: str, row: PromptRow) -> float:
    """1.0 iff the completion's `<answer>` holds the ground truth's integer, else 0.0.

    Both sides read the first integer of their `<answer>...</answer>`; a ground truth without
    the tag is read whole. A completion without the tag or an integer in it scores 0.0.
    """
    expected = extract_answer_integer(_ground_truth(row), require_tag=False)
    if expected is None:
        raise ValueError(f"ground_truth {row.ground_truth!r} holds no integer")
    return 1.0 if extract_answer_integer(completion_text) == expected else 0.0


def exact_answer(completion_text: str, row: PromptRow) -> float:
    """1.0 iff the completion is exactly the ground truth and a stop token ended it, else 0.0.

    The clean stop comes from `Completion.stopped` (`parse_response` found a stop token): the
    right digits cut off by the token limit score 0.0, and so does a plain `str`.
    """
    return 1.0 if is_clean_stop(completion_text) and completion_text == _ground_truth(row) else 0.0


def _ground_truth(row: PromptRow) -> str:
    if row.ground_truth is None:
        raise ValueError("the row has no ground_truth")
    return row.ground_truth


BUILTIN_REWARDS: Final[Mapping[str, Reward]] = {
    "answer_integer_match": answer_integer_match,
    "exact_answer": exact_answer,
}


# -- loading and calling -----------------------------------------------------------------------


def load_reward(name: str) -> Reward:
    """The reward a config names: a `BUILTIN_REWARDS` name, or `"module:function"`.

    Raises `RewardLoadError` saying what is wrong: an unknown name, a module that does not
    import (with its error), a missing attribute, or an object that is not callable with
    `(completion_text, row)`.
    """
    builtin = BUILTIN_REWARDS.get(name)
    if builtin is not None:
        return builtin
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        known = ", ".join(sorted(BUILTIN_REWARDS))
        raise RewardLoadError(
            f"reward {name!r}: not a built-in reward ({known}) nor 'module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config error
        raise RewardLoadError(
            f"reward {name!r}: module {module_name!r} does not import: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardLoadError(f"reward {name!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    _check_callable(name, target)
    reward: Reward = target
    return reward


def _check_callable(name: str, target: Any) -> None:
    if not callable(target):
        kind = type(target).__name__
        raise RewardLoadError(f"reward {name!r}: not callable (a {kind})")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        return
    try:
        signature.bind("", None)
    except TypeError as exc:
        raise RewardLoadError(
            f"reward {name!r}: cannot be called as reward(completion_text, row): {exc}"
        ) from exc


def call_reward(reward: Reward, completion: ParsedResponse, row: PromptRow, *, where: str) -> float:
    """`reward(Completion.from_parsed(completion), row)` as a float, or `RewardError` naming
    `where` (the row's `file:line`) when the reward raises or returns a value that is not a
    finite number.
    """
    try:
        value = reward(Completion.from_parsed(completion), row)
    except Exception as exc:  # a user's reward may raise anything; the row must be named
        raise RewardError(where, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(value, numbers.Real):  # bools and numpy scalars count as numbers
        raise RewardError(where, f"returned {type(value).__name__} {value!r}, not a number")
    if not math.isfinite(float(value)):
        raise RewardError(where, f"returned {value!r}, not a finite number")
    return float(value)
