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
from server.model.pruning import dense_selection, keep_count, model_fingerprint, moe_selection
from server.model.variant import VariantBuilder


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and line."""


def read_prompts(path: str | Path) -> list[str]:
    """The `prompt` field of every line of a JSONL file (other fields are ignored)."""
    prompts = []
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
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Prompts as the server will see them: a one-turn chat when the tokenizer has a template."""
    out = []
    for prompt in prompts:
        if tokenizer.chat_template:
            encoded = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        else:
            ids = tokenizer.encode(prompt)
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

    def parameters(self, kind: str) -> dict[str, Any]:
        if kind == "moe_experts":
            return {"keep_ratio": self.keep_ratio, "keep_experts": self.keep_experts, "threshold": self.threshold}
        return {"sparsity": self.sparsity}


def calibration_statistics(
    builder: VariantBuilder,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    threshold: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> CalibrationStatistics:
    max_length = int(getattr(builder.config, "max_position_embeddings", 2048) or 2048)
    return collect_statistics(
        builder, prompt_token_ids(tokenizer, prompts, max_length), threshold=threshold, progress=progress
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
