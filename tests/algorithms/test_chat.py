"""Chat rendering with loss masks: parity with `apply_chat_template`, hand-computed masks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from algorithms.chat import ChatMessage, ChatRenderer, ChatTemplateError, ParsedResponse
from backend.models.tokenizers import EOS_TOKEN_ID, IM_START_TOKEN_ID, build_byte_tokenizer

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "abcd="}, {"role": "assistant", "content": "dcba"}],
    [
        {"role": "system", "content": "reverse the letters"},
        {"role": "user", "content": "ab="},
        {"role": "assistant", "content": "ba"},
        {"role": "user", "content": "héllo="},
        {"role": "assistant", "content": "olléh"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "line\nbreak"}],
]


def _load(tmp_path_factory: pytest.TempPathFactory, template: str) -> Any:
    """The byte tokenizer saved and reloaded as a directory, as the platform serves it."""
    directory = tmp_path_factory.mktemp(f"tok-{template}")
    build_byte_tokenizer(template).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> ChatRenderer:
    return ChatRenderer(_load(tmp_path_factory, "plain"), name="plain")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> ChatRenderer:
    return ChatRenderer(_load(tmp_path_factory, "chatml"), name="chatml")


def _trained_text(
    renderer: ChatRenderer, tokens: tuple[int, ...], weights: tuple[float, ...]
) -> str:
    kept = [token for token, weight in zip(tokens, weights, strict=True) if weight > 0]
    return str(renderer.tokenizer.decode(kept, skip_special_tokens=False))


def _assert_parity(renderer: ChatRenderer, messages: list[dict[str, Any]]) -> None:
    example = renderer.build_supervised_example(messages)
    expected = renderer.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert list(example.tokens) == list(expected["input_ids"])
    replies = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert _trained_text(renderer, example.tokens, example.weights) == replies


def test_plain_reversal_row_is_the_measured_format(plain: ChatRenderer) -> None:
    example = plain.build_supervised_example(CONVERSATIONS[0])
    # The tiny model's byte tokenizer: bytes "abcd=dcba" + EOS; the answer and EOS are
    # trained, the prompt not.
    assert example.tokens == (97, 98, 99, 100, 61, 100, 99, 98, 97, EOS_TOKEN_ID)
    assert example.weights == (0.0,) * 5 + (1.0,) * 5


def test_chatml_masks_the_role_header_and_the_separator(chatml: ChatRenderer) -> None:
    messages = [{"role": "user", "content": "ab="}, {"role": "assistant", "content": "ba"}]
    example = chatml.build_supervised_example(messages)
    user = [IM_START_TOKEN_ID, *b"user\nab=", EOS_TOKEN_ID, *b"\n"]
    header = [IM_START_TOKEN_ID, *b"assistant\n"]
    assert list(example.tokens) == [*user, *header, *b"ba", EOS_TOKEN_ID, *b"\n"]
    # Only "ba" + <|im_end|>: the header is the generation prompt, "\n" follows the turn's end.
    assert example.weights == (0.0,) * (len(user) + len(header)) + (1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_parity_with_apply_chat_template(
    template: str, index: int, request: pytest.FixtureRequest
) -> None:
    _assert_parity(request.getfixturevalue(template), CONVERSATIONS[index])


@pytest.mark.parametrize(
    ("train_on_what", "expected"),
    [
        ("all_assistant_messages", "ba<|im_end|>olléh<|im_end|>"),
        ("last_assistant_message", "olléh<|im_end|>"),
        ("last_assistant_turn", "olléh<|im_end|>"),
        ("all_user_and_system_messages", "reverse the letters\nab=héllo="),
        ("all_messages", "reverse the letters\nab=ba<|im_end|>héllo=olléh<|im_end|>"),
        ("all_tokens", "reverse the letters\nab=ba<|im_end|>héllo=olléh<|im_end|>"),
    ],
)
def test_train_on_what_selects_messages(
    plain: ChatRenderer, train_on_what: Any, expected: str
) -> None:
    example = plain.build_supervised_example(CONVERSATIONS[1], train_on_what)
    assert _trained_text(plain, example.tokens, example.weights) == expected


def test_a_weight_mark_switches_to_customized(plain: ChatRenderer) -> None:
    messages = [dict(m) for m in CONVERSATIONS[1]]
    messages[2]["weight"] = 0  # first reply excluded; the second stays trainable by default
    messages[3]["trainable"] = True  # a user message included
    example = plain.build_supervised_example(messages, "all_assistant_messages")
    assert _trained_text(plain, example.tokens, example.weights) == "héllo=olléh<|im_end|>"


REWRITING_TEMPLATES = [
    # The last message is bracketed, so every longer render changes the earlier text.
    "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    # A longer conversation renders shorter: the earlier render is cut, not changed.
    "{% if messages | length == 1 %}{{ messages[0]['content'] }}"
    "{% else %}{{ messages[0]['content'][:2] }}{% endif %}",
]


@pytest.mark.parametrize("template", REWRITING_TEMPLATES)
def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(
    tmp_path_factory: pytest.TempPathFactory, template: str
) -> None:
    tokenizer = _load(tmp_path_factory, "plain")
    tokenizer.chat_template = template
    renderer = ChatRenderer(tokenizer, name="rewriting-template")
    with pytest.raises(ChatTemplateError, match="'rewriting-template' is not prefix-stable"):
        renderer.build_supervised_example(CONVERSATIONS[0])


def test_template_failures_and_missing_templates_are_typed(plain: ChatRenderer) -> None:
    tool_row = [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(ChatTemplateError, match="plain template: unknown role tool"):
        plain.build_supervised_example(tool_row)
    bare = build_byte_tokenizer("plain")
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        ChatRenderer(bare)


def test_generation_prompt_and_response_parsing(plain: ChatRenderer, chatml: ChatRenderer) -> None:
    prompt = [{"role": "user", "content": "abcd="}]
    assert plain.build_generation_prompt(prompt) == list(b"abcd=")
    assert chatml.build_generation_prompt(prompt)[-11:] == [IM_START_TOKEN_ID, *b"assistant\n"]
    assert plain.stop_token_ids == frozenset({EOS_TOKEN_ID})
    completion = [*b"dcba", EOS_TOKEN_ID, *b"zz"]
    assert plain.parse_response(completion) == ParsedResponse(text="dcba", stopped=True)
    assert plain.parse_response(list(b"dcb")) == ParsedResponse(text="dcb", stopped=False)


def test_message_normalisation() -> None:
    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": "c="}]
    assert ChatMessage.model_validate({"role": "user", "content": parts}).content == "abc="
    thinking = {"role": "assistant", "content": "x", "reasoning_content": "because"}
    assert ChatMessage.model_validate(thinking).thinking == "because"
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}
    assert ChatMessage.model_validate(tool_call).content == ""
    with pytest.raises(ValidationError, match="part 0 is not a text part"):
        ChatMessage.model_validate({"role": "user", "content": [{"type": "image_url"}]})
    with pytest.raises(ValidationError, match="must be 0 or 1"):
        ChatMessage.model_validate({"role": "assistant", "content": "x", "weight": 0.5})


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> ChatRenderer:
    from backend.models.store import ensure_model_dir

    model_dir = ensure_model_dir("smollm2-135m", tmp_path_factory.mktemp("data"))
    return ChatRenderer(AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.slow  # the first use converts the SmolLM2 GGUF (~20 s on 2 cores)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_parity_with_the_smollm2_template(smollm2: ChatRenderer, index: int) -> None:
    _assert_parity(smollm2, CONVERSATIONS[index])
    # SmolLM2's template adds a default system prompt; it must never be trained.
    example = smollm2.build_supervised_example(CONVERSATIONS[0])
    assert _trained_text(smollm2, example.tokens, example.weights) == "dcba<|im_end|>"


def test_smollm2_style_default_system_prompt_on_the_byte_tokenizer(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A cheap stand-in for SmolLM2's template shape: a system prompt added on the first turn."""
    tokenizer = _load(tmp_path_factory, "chatml")
    tokenizer.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nbe brief<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    _assert_parity(ChatRenderer(tokenizer, name="default-system"), CONVERSATIONS[0])
