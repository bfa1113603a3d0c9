"""What the server needs to know about its model, computed once at load: the tokenizer and its chat template,
the context length, the tokens that end a generation, the family kind and the fingerprint patterns carry.

Everyone who turns a conversation into token ids, asks how long the context is or which tokens end a
generation asks here (the request path, pattern calibration, the demo evaluation), so they all agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from server.errors import ContextTooLong, InvalidRequest
from server.model.checkpoint import model_fingerprint, read_generation_config
from server.model.families import family_for

MAX_CHARACTERS_PER_TOKEN = 32
"""A text longer than this many characters per context token cannot fit: refused untokenized."""


def context_length(config: PretrainedConfig) -> int | None:
    """The model's context in tokens (`max_position_embeddings`); None when the config does not say."""
    return int(getattr(config, "max_position_embeddings", 0) or 0) or None


def template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (with the assistant's turn opened
    when `generation_prompt`)."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def end_of_generation_ids(tokenizer: PreTrainedTokenizerBase | None, config: Any) -> tuple[int, ...]:
    """Every token that ends a generation: the tokenizer's EOS (when given) and all of `config`'s (a
    generation config, or a model config)."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return tuple(sorted(ids))


@dataclass(frozen=True)
class ModelInfo:
    """One model's facts, as served under `name`."""

    directory: Path
    name: str
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    generation_config: GenerationConfig | None
    kind: str  # "moe" or "dense"
    fingerprint: str
    context_length: int | None
    eos_ids: tuple[int, ...]

    @classmethod
    def load(
        cls,
        directory: str | Path,
        name: str | None = None,
        config: PretrainedConfig | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> ModelInfo:
        """Read the facts of the checkpoint in `directory` (its tokenizer, a few kilobytes per weight file for
        the fingerprint, and its config and generation config unless a `VariantBuilder` already read them);
        `name` defaults to the directory's name."""
        directory = Path(directory)
        config = config or AutoConfig.from_pretrained(directory).get_text_config()  # Qwen3.5: its text model
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        generation_config = generation_config or read_generation_config(directory)
        return cls(
            directory=directory,
            name=name or directory.resolve().name,
            tokenizer=tokenizer,
            config=config,
            generation_config=generation_config,
            kind=family_for(config.model_type).kind,
            fingerprint=model_fingerprint(directory),
            context_length=context_length(config),
            eos_ids=end_of_generation_ids(tokenizer, generation_config),
        )

    @property
    def character_limit(self) -> int:
        """Texts longer than this cannot fit the context at any tokenization."""
        return MAX_CHARACTERS_PER_TOKEN * (self.context_length or 2**20)

    def check_chat(self, messages: Sequence[dict[str, Any]]) -> None:
        """Refuse, untokenized, a conversation too long for the context at any tokenization (tokenizing is
        where the time goes)."""
        characters = sum(len(str(message.get("content") or "")) for message in messages)
        if characters > self.character_limit:
            raise ContextTooLong(
                f"messages of {characters} characters cannot fit this model's context of {self.context_length} tokens",
                param="messages",
            )

    def check_prompts(self, texts: Sequence[str]) -> None:
        """Refuse, untokenized, text prompts that could never fit the context."""
        for text in texts:
            if len(text) > self.character_limit:
                raise ContextTooLong(
                    f"a prompt of {len(text)} characters cannot fit this model's context of "
                    f"{self.context_length} tokens",
                    param="prompt",
                )

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation, the assistant's turn opened (checked by `check_chat` first)."""
        try:
            return template_ids(self.tokenizer, messages)
        except Exception as error:  # the model's own template rejects the conversation (jinja raises)
            raise InvalidRequest(
                f"the model's chat template rejects these messages: {error}", param="messages"
            ) from None

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of text prompts (checked by `check_prompts` first)."""
        return [list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]
