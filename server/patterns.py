"""Making a task pattern from prompts: calibrate, score, select, embed the examples, store.

Used by `taskmoe calibrate`, the demo-store script and (later) the admin API, so that all three make
patterns the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pattern_store.embedder import Embedder
from pattern_store.pattern import TaskPattern, validate_name
from server.model.calibrate import CalibrationStatistics, collect_statistics
from server.model.pruning import (
    DENSE_METHODS,
    MOE_METHODS,
    dense_selection,
    keep_count,
    model_fingerprint,
    moe_selection,
)
from server.model.variant import VariantBuilder


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class CalibrationText:
    """A prompt and, when the file gives one, the response that the task expects to it."""

    prompt: str
    response: str | None = None


def read_calibration(path: str | Path) -> list[CalibrationText]:
    """JSONL lines with a `prompt` field and an optional `response` field (other fields are ignored).

    With responses, calibration sees the whole exchange, as serving does: the answer's tokens are routed
    through the experts too, and a pattern calibrated on prompts alone can miss the experts that write it.
    """
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise PromptFileError(f"{path}: cannot read ({error.strerror})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}:{number}: not JSON ({error.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{path}:{number}: each line needs a non-empty string field 'prompt'")
        response = record.get("response")
        if response is not None and not isinstance(response, str):
            raise PromptFileError(f"{path}:{number}: 'response' must be a string")
        records.append(CalibrationText(prompt, response))
    if not records:
        raise PromptFileError(f"{path}: no prompts")
    return records


def read_prompts(path: str | Path) -> list[str]:
    """The `prompt` field of every line of a JSONL file."""
    return [record.prompt for record in read_calibration(path)]


def calibration_token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[CalibrationText], max_length: int
) -> list[list[int]]:
    """Token ids as the server sees them: a one-turn chat (with the response as the assistant's turn when
    there is one) when the tokenizer has a chat template, else the plain text."""
    out = []
    for text in texts:
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": text.prompt}]
            if text.response is not None:
                messages.append({"role": "assistant", "content": text.response})
            encoded = tokenizer.apply_chat_template(
                messages, add_generation_prompt=text.response is None, tokenize=True
            )
            ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        else:
            ids = tokenizer.encode(text.prompt + (f" {text.response}" if text.response else ""))
        out.append(ids[:max_length])
    return out


@dataclass
class PatternRecipe:
    """How to turn statistics into a selection: MoE (keep ratio or count, method) or dense (sparsity)."""

    method: str = "tcess"
    keep_ratio: float | None = 0.5
    keep_experts: int | None = None
    threshold: float = 0.0
    sparsity: float = 0.2
    seed: int = 0

    def validate(self, moe: bool) -> None:
        """Fail before calibrating (which takes a while) rather than after."""
        methods = MOE_METHODS if moe else DENSE_METHODS
        if self.method not in methods:
            raise ValueError(f"unknown method {self.method!r} for this model; expected one of {', '.join(methods)}")
        if moe and self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ValueError("keep must be in (0, 1]")
        if not moe and not 0 <= self.sparsity < 1:
            raise ValueError("sparsity must be in [0, 1)")

    def parameters(self, kind: str) -> dict[str, Any]:
        if kind == "moe_experts":
            return {"keep_ratio": self.keep_ratio, "keep_experts": self.keep_experts, "threshold": self.threshold}
        return {"sparsity": self.sparsity}


def calibration_statistics(
    builder: VariantBuilder,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[CalibrationText],
    threshold: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> CalibrationStatistics:
    max_length = int(getattr(builder.config, "max_position_embeddings", 2048) or 2048)
    return collect_statistics(
        builder, calibration_token_ids(tokenizer, texts, max_length), threshold=threshold, progress=progress
    )


def pattern_from_statistics(
    name: str,
    builder: VariantBuilder,
    stats: CalibrationStatistics,
    recipe: PatternRecipe,
    examples: Sequence[str],
    embedder: Embedder | None,
    fingerprint: str | None = None,
) -> TaskPattern:
    validate_name(name)
    if stats.kind == "moe_experts":
        layer = next(iter(builder.sparse_layers.values()))
        keep = keep_count(
            layer.num_experts, int(builder.config.num_experts_per_tok), recipe.keep_ratio, recipe.keep_experts
        )
        pruned = moe_selection(stats, keep, recipe.method, recipe.seed)
    else:
        pruned = dense_selection(stats, builder, recipe.sparsity, recipe.method, seed=recipe.seed)
    return TaskPattern(
        name=name,
        selection=pruned.selection,
        scores=pruned.scores,
        method=recipe.method,
        parameters=recipe.parameters(stats.kind),
        model_fingerprint=fingerprint or model_fingerprint(builder.model_dir),
        created=time.time(),
        calibration_prompts=stats.prompts,
        examples=list(examples),
        example_embeddings=embedder.embed(list(examples)) if embedder is not None else None,
    )


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir))
