"""The byte-level tokenizer of the tiny models, built in code (no download).

CI needs a tokenizer with no input files and a vocabulary small enough that the LM head stays
cheap: every UTF-8 byte is one token whose id equals the byte value, plus three specials. It is
saved as an ordinary HF tokenizer directory, so the trainer, the inference server and tinker's
`AutoTokenizer.from_pretrained(dir)` all load the same ids offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, cast

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from backend.models.registry import ByteChatTemplate

logger = logging.getLogger(__name__)

# transformers leaves the fast-tokenizer constructor unannotated (`*args, **kwargs`).
_wrap_tokenizer = cast(Callable[..., PreTrainedTokenizerFast], PreTrainedTokenizerFast)

PAD_TOKEN: Final = "<|endoftext|>"
IM_START_TOKEN: Final = "<|im_start|>"
EOS_TOKEN: Final = "<|im_end|>"
PAD_TOKEN_ID: Final = 256
IM_START_TOKEN_ID: Final = 257
EOS_TOKEN_ID: Final = 258
BYTE_VOCAB_SIZE: Final = 259

# The plain template renders a row exactly as the measured toy tasks were trained:
# user "abcd=" / assistant "dcba" -> bytes "abcd=dcba" + <|im_end|>. Nothing is added for the
# generation prompt, so a prompt is the user text itself.
PLAIN_CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + '<|im_end|>' }}"
    "{%- else -%}{{ raise_exception('plain template: unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# ChatML as Qwen and SmolLM2 use it, so renderer tests exercise role headers on a cheap model.
CHATML_CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES: Final[dict[ByteChatTemplate, str]] = {
    "plain": PLAIN_CHAT_TEMPLATE,
    "chatml": CHATML_CHAT_TEMPLATE,
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which `ByteLevel` pre-tokenizes into.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def build_byte_tokenizer(
    chat_template: ByteChatTemplate = "plain", *, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer: ids 0-255 are the bytes themselves, 256-258 the specials."""
    # A BPE with no merges over the byte alphabet is a pure byte lookup; ids equal byte values.
    vocab = {char: byte for byte, char in byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, so every byte sequence round-trips exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Added in id order, so they take 256, 257, 258.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)
        ]
    )
    if tokenizer.get_vocab_size(with_added_tokens=True) != BYTE_VOCAB_SIZE:
        raise AssertionError("byte tokenizer: unexpected vocabulary size")
    wrapped = _wrap_tokenizer(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    wrapped.chat_template = CHAT_TEMPLATES[chat_template]
    logger.debug("built byte tokenizer with the %s chat template", chat_template)
    return wrapped
