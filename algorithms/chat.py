"""Chat rendering with loss masks: conversations -> (tokens, weights) through the HF chat template.

The tokenizer's own chat template is the renderer, so training sees exactly the ids the serving
side builds (renderer drift causes train/inference mismatch). Per-message token
spans come from rendering growing prefixes of the conversation; a template for which a prefix's
tokens are not a prefix of the next render (one that rewrites earlier turns) is refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant", "tool"]
TrainOnWhat = Literal[
    "last_assistant_message",
    "last_assistant_turn",
    "all_assistant_messages",
    "all_messages",
    "all_tokens",
    "all_user_and_system_messages",
    "customized",
]
TRAIN_ON_WHAT_VALUES: Final[tuple[TrainOnWhat, ...]] = get_args(TrainOnWhat)

# Tokens that close a turn in common templates; the trained span of an assistant message ends at
# the last of these, so separators a template prints after it (ChatML's "\n") are not trained.
_END_OF_TURN_TOKENS: Final = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class ChatTemplateError(ValueError):
    """The chat template cannot render this conversation with per-message loss masks."""

    retryable: ClassVar[bool] = False


class ChatMessage(BaseModel):
    """One chat message; unknown keys are ignored, known ones validated.

    `content` may arrive as OpenAI parts (`[{"type": "text", "text": ...}]`): text parts are
    joined, any other part is refused. `reasoning_content` fills `thinking` when that is absent.
    `content: null` is read as "" when the message has `tool_calls`. `weight` (0/1) or
    `trainable` mark a message for `train_on_what="customized"`.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: Role
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    thinking: str | None = None
    weight: float | None = None
    trainable: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("thinking") is None and data.get("reasoning_content") is not None:
            data["thinking"] = data["reasoning_content"]
        # OpenAI convention: an assistant message that only calls tools has `content: null`.
        if data.get("content", "") is None and data.get("tool_calls"):
            data["content"] = ""
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts: list[str] = []
        for index, part in enumerate(value):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise ValueError(f"part {index} is not a text part ({{'type': 'text', ...}})")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"part {index} has no string 'text'")
            texts.append(text)
        return "".join(texts)

    @field_validator("weight")
    @classmethod
    def _weight_is_binary(cls, value: float | None) -> float | None:
        if value is not None and value not in (0.0, 1.0):
            raise ValueError(f"must be 0 or 1, got {value}")
        return value

    @property
    def marks_trainable(self) -> bool:
        """Whether the message carries an explicit `weight` or `trainable` (→ customized)."""
        return self.weight is not None or self.trainable is not None

    def is_trainable(self) -> bool:
        """The customized rule: explicit `trainable`, else `weight == 1`, else assistant."""
        if self.trainable is not None:
            return self.trainable
        if self.weight is not None:
            return self.weight == 1.0
        return self.role == "assistant"

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (None fields left out)."""
        rendered: dict[str, Any] = {"role": self.role, "content": self.content}
        for key in ("tool_calls", "tool_call_id", "name"):
            value = getattr(self, key)
            if value is not None:
                rendered[key] = value
        if self.thinking is not None:
            # Templates disagree on the key (Qwen3 reads reasoning_content); give both.
            rendered["thinking"] = self.thinking
            rendered["reasoning_content"] = self.thinking
        return rendered


@dataclass(frozen=True)
class SupervisedExample:
    """A rendered conversation: token ids and one loss weight per token (same length)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.weights):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and weights ({len(self.weights)}) differ in length"
            )

    @property
    def trained_tokens(self) -> int:
        """Tokens with a positive weight."""
        return sum(1 for weight in self.weights if weight > 0)


@dataclass(frozen=True)
class _Span:
    """Token span [start, end) of one message; `prompt_end` is where an assistant's reply begins."""

    start: int
    prompt_end: int
    end: int


def effective_train_on_what(
    messages: Sequence[ChatMessage], train_on_what: TrainOnWhat
) -> TrainOnWhat:
    """`customized` as soon as any message carries `weight`/`trainable`: the row chose its own."""
    if any(message.marks_trainable for message in messages):
        return "customized"
    return train_on_what


@dataclass(frozen=True)
class ParsedResponse:
    """A sampled completion cut at its first stop token."""

    text: str
    stopped: bool  # True when a stop token (EOS / end of turn) ended it


def strip_trailing_assistant(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The prompt part of a conversation: trailing assistant messages removed."""
    end = len(messages)
    while end > 0 and messages[end - 1].role == "assistant":
        end -= 1
    return list(messages[:end])


def as_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[ChatMessage]:
    """Validate plain `{"role", "content", ...}` dicts into `ChatMessage`s (models pass through)."""
    return [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]


class ChatRenderer:
    """Renders conversations with a tokenizer's HF chat template.

    `build_supervised_example` gives (tokens, weights); `build_generation_prompt` the prompt ids
    for sampling; `parse_response` cuts a completion at its first stop token. `name` only labels
    errors (default: the tokenizer's `name_or_path`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, name: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"tokenizer {self.name!r} has no chat template")
        self.stop_token_ids = _stop_token_ids(tokenizer)

    def build_supervised_example(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        train_on_what: TrainOnWhat = "all_assistant_messages",
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> SupervisedExample:
        """Tokens of the whole conversation and a 0/1 weight per token.

        Weight 1 goes to the selected messages: an assistant message's reply (its content and
        end-of-turn token, not the role header a generation prompt prints, nor a separator after
        the end-of-turn token); any other message's whole span. `all_tokens` weights everything.
        """
        chat = as_messages(messages)
        if not chat:
            raise ChatTemplateError("cannot render an empty conversation")
        mode = effective_train_on_what(chat, train_on_what)
        tokens, spans = self._render_spans(chat, tools)
        if mode == "all_tokens":
            return SupervisedExample(tuple(tokens), (1.0,) * len(tokens))
        weights = [0.0] * len(tokens)
        for message, span, selected in zip(chat, spans, _selection(chat, mode), strict=True):
            if not selected:
                continue
            start, end = span.start, span.end
            if message.role == "assistant":
                start, end = span.prompt_end, self._reply_end(tokens, span)
            weights[start:end] = [1.0] * (end - start)
        return SupervisedExample(tuple(tokens), tuple(weights))

    def build_generation_prompt(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Prompt ids for sampling the next assistant message (`add_generation_prompt=True`)."""
        chat = as_messages(messages)
        return self._render([m.template_dict() for m in chat], tools, generation_prompt=True)

    def parse_response(self, tokens: Sequence[int]) -> ParsedResponse:
        """Decode a completion up to (not including) its first stop token."""
        cut = next((i for i, t in enumerate(tokens) if t in self.stop_token_ids), None)
        kept = list(tokens if cut is None else tokens[:cut])
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        return ParsedResponse(text=str(text), stopped=cut is not None)

    def _render_spans(
        self, chat: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None
    ) -> tuple[list[int], list[_Span]]:
        """Render growing prefixes; message i spans the tokens its render appended.

        An assistant message's reply starts after the generation prompt of the messages before
        it. The first message has no rendered prefix (templates refuse empty conversations),
        so a leading assistant message is trained with its role header.
        """
        dicts = [message.template_dict() for message in chat]
        previous: list[int] = []
        spans: list[_Span] = []
        for index, message in enumerate(chat):
            prompt = previous
            if message.role == "assistant" and index > 0:
                prompt = self._render(dicts[:index], tools, generation_prompt=True)
                self._check_prefix(previous, prompt, index, "its generation prompt")
            rendered = self._render(dicts[: index + 1], tools, generation_prompt=False)
            self._check_prefix(prompt, rendered, index, "the conversation up to it")
            spans.append(_Span(start=len(previous), prompt_end=len(prompt), end=len(rendered)))
            previous = rendered
        return previous, spans

    def _render(
        self,
        dicts: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        *,
        generation_prompt: bool,
    ) -> list[int]:
        try:
            encoded = self.tokenizer.apply_chat_template(
                [dict(d) for d in dicts],
                tools=[dict(t) for t in tools] if tools is not None else None,
                add_generation_prompt=generation_prompt,
                tokenize=True,
                return_dict=True,
            )
        # A template is arbitrary Jinja: any failure inside it is a rendering error of this row.
        except Exception as exc:
            raise ChatTemplateError(f"chat template of {self.name!r} failed: {exc}") from exc
        # transformers 5 returns a BatchEncoding (a Mapping) for tokenize=True, return_dict=True.
        if not isinstance(encoded, Mapping):
            raise ChatTemplateError(f"apply_chat_template returned {type(encoded).__name__}")
        return [int(token) for token in encoded["input_ids"]]

    def _check_prefix(self, prefix: list[int], tokens: list[int], index: int, what: str) -> None:
        if tokens[: len(prefix)] == prefix:
            return
        pairs = enumerate(zip(prefix, tokens, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(prefix), len(tokens)))
        raise ChatTemplateError(
            f"chat template of {self.name!r} is not prefix-stable: rendering message {index} "
            f"changes token {at} of {what} (the template rewrites earlier text, e.g. strips past "
            "reasoning); per-message loss masks need a template that only appends"
        )

    def _reply_end(self, tokens: Sequence[int], span: _Span) -> int:
        """One past the last end-of-turn token of the reply, else the end of its span."""
        for position in range(span.end - 1, span.prompt_end - 1, -1):
            if tokens[position] in self.stop_token_ids:
                return position + 1
        return span.end


def _selection(chat: Sequence[ChatMessage], mode: TrainOnWhat) -> list[bool]:
    """Which messages `mode` trains (`all_tokens` is handled by the caller)."""
    roles = [message.role for message in chat]
    last_user = max((i for i, role in enumerate(roles) if role == "user"), default=-1)
    last_assistant = max((i for i, role in enumerate(roles) if role == "assistant"), default=-1)
    return [_selected(chat, i, mode, last_user, last_assistant) for i in range(len(chat))]


def _selected(
    chat: Sequence[ChatMessage], i: int, mode: TrainOnWhat, last_user: int, last_assistant: int
) -> bool:
    role = chat[i].role
    if mode == "all_assistant_messages":
        return role == "assistant"
    if mode == "last_assistant_message":
        return i == last_assistant
    if mode == "last_assistant_turn":  # the assistant messages after the last user message
        return role == "assistant" and i > last_user
    if mode == "all_user_and_system_messages":
        return role in ("user", "system")
    if mode == "customized":
        return chat[i].is_trainable()
    return True  # all_messages, all_tokens


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS plus the template end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab}
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    return frozenset(ids)
