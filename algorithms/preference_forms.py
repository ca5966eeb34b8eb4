"""The three accepted preference JSONL forms, each read into one `PreferenceRow`.

Users bring pairs in whichever shape their tools write: chosen/rejected sides, two scored samples,
or OpenAI's preferred/non-preferred outputs. Every problem is reported with the field it is in
(`samples[1].score`, `chosen.messages[0].role`), so the file can be fixed before any compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

from algorithms.chat import ChatMessage
from algorithms.datasets import error_message, field_path

PreferenceSide = list[ChatMessage] | str  # a conversation, or raw text tokenized as is
_MESSAGES: Final = TypeAdapter(list[ChatMessage])
_Side = TypeVar("_Side", list[ChatMessage], str)


def side_problem(side: PreferenceSide) -> str | None:
    """Why one side of a pair has nothing to prefer, or None when it has."""
    if isinstance(side, str):
        return "empty text" if not side.strip() else None
    if not side:
        return "no messages"
    if not any(m.role == "assistant" and (m.content or m.tool_calls) for m in side):
        return "no assistant content"
    return None


class PreferenceRow(BaseModel):
    """One preference pair: the `chosen` and `rejected` sides, each a whole conversation or text.

    Both sides carry their prompt (a conversation repeats it; rendering finds the shared prefix).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    chosen: PreferenceSide
    rejected: PreferenceSide

    @model_validator(mode="after")
    def _sides_differ_and_have_content(self) -> PreferenceRow:
        for name, side in (("chosen", self.chosen), ("rejected", self.rejected)):
            if (problem := side_problem(side)) is not None:
                raise ValueError(f"{name}: {problem}")
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are identical")
        return self

    def jsonl_dict(self) -> dict[str, Any]:
        """The row in the chosen/rejected form, as a JSONL line holds it."""
        return {"chosen": _side_dict(self.chosen), "rejected": _side_dict(self.rejected)}


def _side_dict(side: PreferenceSide) -> dict[str, Any]:
    if isinstance(side, str):
        return {"text": side}
    return {"messages": [m.model_dump(exclude_none=True) for m in side]}


class RowProblemsError(Exception):
    """The (field, message) problems of one row; raised by the form readers."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


def _problem(field: str, message: str) -> RowProblemsError:
    return RowProblemsError([(field, message)])


def parse_preference(value: Mapping[str, Any]) -> PreferenceRow:
    """The pair of one JSON object in any accepted form; raises `ValueError` naming the field.

    Forms: `{"chosen": S, "rejected": S}` with S `{"messages": [...]}` or `{"text": "..."}`;
    `{"samples": [{"messages": ..., "score": 1.0}, {"messages": ..., "score": 0.0}]}` (score
    or `evals.score`); `{"input": ..., "preferred_output": ..., "non_preferred_output": ...}`.
    """
    try:
        return read_row(value)
    except RowProblemsError as exc:
        message = "; ".join(f"{field}: {message}" for field, message in exc.problems)
        raise ValueError(message) from None


def read_row(value: Mapping[str, Any]) -> PreferenceRow:
    """The pair of one JSON object; raises `RowProblemsError` with each (field, message)."""
    if "chosen" in value or "rejected" in value:
        chosen = _side(value, "chosen")
        rejected = _side(value, "rejected")
        return _pair(chosen, rejected, "rejected")
    if "samples" in value:
        return _read_samples(value["samples"])
    if {"input", "preferred_output", "non_preferred_output"} & value.keys():
        return _read_openai(value)
    keys = ", ".join(sorted(value)) or "none"
    raise _problem(
        "(row)",
        "unknown preference form: expected chosen/rejected, samples, or "
        f"input/preferred_output/non_preferred_output (keys: {keys})",
    )


def _pair(chosen: PreferenceSide, rejected: PreferenceSide, field: str) -> PreferenceRow:
    if chosen == rejected:
        raise _problem(field, "identical to the chosen side")
    try:
        return PreferenceRow(chosen=chosen, rejected=rejected)
    except ValidationError as exc:  # the readers check each side first; this is a backstop
        raise _problem("(row)", error_message(exc.errors()[0])) from None


def _messages(value: Any, field: str) -> list[ChatMessage]:
    """Validated messages, every problem named by its path under `field`."""
    try:
        return _MESSAGES.validate_python(value)
    except ValidationError as exc:
        raise RowProblemsError(
            [(field_path((field, *error["loc"])), error_message(error)) for error in exc.errors()]
        ) from None


def _checked(side: _Side, field: str) -> _Side:
    if (problem := side_problem(side)) is not None:
        raise _problem(field, problem)
    return side


def _side(value: Mapping[str, Any], field: str) -> PreferenceSide:
    """A chosen/rejected side: `{"messages": [...]}` or `{"text": "..."}`."""
    if field not in value:
        raise _problem(field, "missing")
    side = value[field]
    if not isinstance(side, Mapping) or ("messages" in side) == ("text" in side):
        raise _problem(field, 'expected {"messages": [...]} or {"text": "..."}')
    if "text" in side:
        if not isinstance(side["text"], str):
            raise _problem(f"{field}.text", "expected a string")
        return _checked(side["text"], f"{field}.text")
    return _checked(_messages(side["messages"], f"{field}.messages"), f"{field}.messages")


def _read_samples(samples: Any) -> PreferenceRow:
    """Two scored samples: exactly one scored 1.0 (chosen) and one 0.0 (rejected)."""
    if not isinstance(samples, list) or len(samples) != 2:
        raise _problem("samples", "expected a list of two samples (scores 1.0 and 0.0)")
    problems: list[tuple[str, str]] = []
    sides: dict[float, tuple[int, list[ChatMessage]]] = {}
    for index, sample in enumerate(samples):
        field = f"samples[{index}]"
        if not isinstance(sample, Mapping):
            problems.append((field, "expected an object"))
            continue
        try:
            score = _score(sample, field)
        except RowProblemsError as exc:
            problems.extend(exc.problems)
            score = None
        try:
            messages = _checked(_messages(sample.get("messages"), f"{field}.messages"), field)
        except RowProblemsError as exc:
            problems.extend(exc.problems)
            continue
        if score is None:
            continue
        if score in sides:
            problems.append((f"{field}.score", f"a second sample scored {score}"))
        sides[score] = (index, messages)
    if problems:
        raise RowProblemsError(problems)
    rejected_index, rejected = sides[0.0]
    return _pair(sides[1.0][1], rejected, f"samples[{rejected_index}]")


def _score(sample: Mapping[str, Any], field: str) -> float:
    """`score`, else `evals.score`; only 1.0 and 0.0 are preferences (graded scores refused)."""
    evals = sample.get("evals")
    if "score" in sample:
        score, where = sample["score"], f"{field}.score"
    elif isinstance(evals, Mapping) and "score" in evals:
        score, where = evals["score"], f"{field}.evals.score"
    else:
        raise _problem(f"{field}.score", "missing (score or evals.score)")
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise _problem(where, f"expected 1.0 or 0.0, got {score!r}")
    if score not in (0.0, 1.0):
        raise _problem(where, f"graded score {score}: only 1.0 (chosen) and 0.0 (rejected)")
    return float(score)


def _read_openai(value: Mapping[str, Any]) -> PreferenceRow:
    """OpenAI's form: a shared `input` prompt, then each output appended to it."""
    for field in ("input", "preferred_output", "non_preferred_output"):
        if field not in value:
            raise _problem(field, "missing")
    prompt = value["input"]
    if isinstance(prompt, Mapping):
        if "messages" not in prompt:
            raise _problem("input.messages", "missing")
        prompt_messages = _messages(prompt["messages"], "input.messages")
    elif isinstance(prompt, str):
        prompt_messages = [ChatMessage(role="user", content=prompt)]
    else:
        prompt_messages = _messages(prompt, "input")
    chosen = _output(value["preferred_output"], "preferred_output")
    rejected = _output(value["non_preferred_output"], "non_preferred_output")
    if chosen == rejected:
        raise _problem("non_preferred_output", "identical to preferred_output")
    return _pair([*prompt_messages, *chosen], [*prompt_messages, *rejected], "non_preferred_output")


def _output(value: Any, field: str) -> list[ChatMessage]:
    """An output: messages, or a string read as one assistant message."""
    if isinstance(value, str):
        messages = [ChatMessage(role="assistant", content=value)]
    else:
        messages = _messages(value, field)
    return _checked(messages, field)
