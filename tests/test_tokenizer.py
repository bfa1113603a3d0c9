"""The character tokenizer round-trips text, saves in the standard layout and has a chat template."""

from __future__ import annotations

from transformers import AutoTokenizer

from demo.tokenizer import END, build_char_tokenizer, save_char_tokenizer


def test_one_token_per_character_and_round_trip() -> None:
    tokenizer = build_char_tokenizer()
    text = "What is 37 + 48? Reverse 'kelbo'!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens() -> None:
    tokenizer = build_char_tokenizer()
    ids = tokenizer.encode(f"ab{END}", add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 3


def test_saved_tokenizer_loads_with_auto_and_applies_chat_template(tmp_path) -> None:
    save_char_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>What is 1 + 2?<|end|><|assistant|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer.encode("héllo", add_special_tokens=False)) != "héllo", "non-ASCII is unknown"
