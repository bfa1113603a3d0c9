"""A character-level tokenizer with a chat template, built with the `tokenizers` library.

The demo tasks are about characters (reversing, counting, upper-casing), so one token per character
makes them learnable by a model of a few megabytes. Saved in the standard layout, it loads with
`AutoTokenizer.from_pretrained` and supports `apply_chat_template`.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, UNK, END = "<|pad|>", "<|unk|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, UNK, END, *ROLE_TOKENS)

#: One turn is `<|role|>content<|end|>`; the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Special tokens first (ids 0..5), then every printable ASCII character."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        if char not in "\t\n\r\x0b\x0c":
            vocab.setdefault(char, len(vocab))
    vocab.setdefault("\n", len(vocab))
    # A BPE without merges over single characters is a character tokenizer; Fuse() joins them back.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        bos_token=None,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_char_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer and write it (with its chat template) into `directory`."""
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
