"""The tiny model and its byte-level tokenizer: built offline, same bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.models.tiny import TINY_PARAMETER_COUNT, build_tiny
from backend.models.tokenizers import build_byte_tokenizer

EXAMPLE_ROW = [{"role": "user", "content": "abcd="}, {"role": "assistant", "content": "dcba"}]
TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld — naïve café",
    "日本語のテキスト",
    "emoji 🙂🚀 and a ZWJ family 👨‍👩‍👧",
    "\x00\x01\x02\x7f control bytes",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(rendered["input_ids"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def test_build_writes_the_hf_directory(tiny_dir: Path) -> None:
    names = {path.name for path in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    assert (tiny_dir / "model.safetensors").stat().st_size < 1_500_000


def test_same_seed_gives_the_same_bytes_and_leaves_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = build_tiny(tmp_path / "a")
    second = build_tiny(tmp_path / "b")
    third = build_tiny(tmp_path / "c", seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    weights = [_sha256(path / "model.safetensors") for path in (first, second, third)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_architecture_reloads_offline(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.num_parameters() == TINY_PARAMETER_COUNT == 328_832
    assert model.dtype == torch.float32
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (259, 128, 256)
    assert (config.num_hidden_layers, config.num_attention_heads) == (2, 4)
    assert (config.num_key_value_heads, config.head_dim) == (2, 32)
    assert config.max_position_embeddings == 256
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.rms_norm_eps == 1e-6
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (256, 258, 256)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (258, 256)


def test_forward_accepts_the_probe_ids_and_every_token(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    # Ids 1 and 2 are what the platform's warmup and readiness probes send.
    input_ids = torch.tensor([[1, 2, *range(0, 259, 8), 258]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 259)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_are_the_utf8_bytes(tiny_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_tokenizer_specials(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokenizer) == 259
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (256, 258)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 257
    assert tokenizer.encode("a<|im_end|>") == [97, 258]
    assert tokenizer.decode([97, 258], skip_special_tokens=True) == "a"
    assert tokenizer.decode([1, 2]) == "\x01\x02"


def test_plain_template_renders_the_toy_task_format(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert _chat_ids(tokenizer, EXAMPLE_ROW) == [97, 98, 99, 100, 61, 100, 99, 98, 97, 258]
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "abcd="}]
    with_prompt = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    assert with_prompt == _chat_ids(tokenizer, prompt) == list(b"sys\nabcd=")


def test_chatml_template() -> None:
    tokenizer = build_byte_tokenizer("chatml")
    text = tokenizer.apply_chat_template(
        EXAMPLE_ROW[:1], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nabcd=<|im_end|>\n<|im_start|>assistant\n"
    ids = _chat_ids(tokenizer, EXAMPLE_ROW)
    assert ids[0] == 257
    assert ids.count(258) == 2
    assert tokenizer.decode(ids) == (
        "<|im_start|>user\nabcd=<|im_end|>\n<|im_start|>assistant\ndcba<|im_end|>\n"
    )
