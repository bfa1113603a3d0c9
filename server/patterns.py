"""Making a task pattern from prompts: calibrate, score, select (and refine), embed the examples.

Used by `taskmoe calibrate`, the admin API's calibration jobs and the demo-store script, so that all three
make patterns the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pattern_store.coverage import calibrated_coverage
from pattern_store.embedder import Embedder
from pattern_store.pattern import TaskPattern, validate_name
from pattern_store.recipes import (
    BUDGETS,
    DEFAULT_KEEP,
    DEFAULT_MOE_METHOD,
    DEFAULT_RANK,
    DEFAULT_TARGET,
    DENSE_METHODS,
    KEEP_AUTO,
    LOSS_BUDGET,
    LOW_RANK,
    MOE_METHODS,
    OUTPUT_METHODS,
    REFINEMENTS,
    SUBSTITUTES,
)
from pattern_store.selection import Selection
from server.keep_search import candidate_counts, held_out_indices, matches, search_keep
from server.model.answer_loss_refinement import refine_by_answer_loss
from server.model.calibrate import CalibrationStatistics, collect_statistics
from server.model.checkpoint import model_fingerprint, model_identity
from server.model.local_refinement import SearchOptions, refine_locally
from server.model.novices import NoviceTable
from server.model.pruning import (
    PrunedSelection,
    dense_selection,
    expert_counts,
    keep_count,
    moe_selection,
)
from server.model.variant import VariantBuilder
from server.model_info import context_length, end_of_generation_ids, template_ids


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Where the answer begins: the prompt's tokens are a prefix of the exchange's (up to the template)."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration texts as the model sees them: token ids, and where each one's answer begins (its length
    when it has none). The answer tokens are what refinement by answer loss scores."""

    token_ids: list[list[int]]
    answer_starts: list[int]


def calibration_set(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[CalibrationText], max_length: int
) -> CalibrationSet:
    """Token ids as the server sees them: a one-turn chat (with the response as the assistant's turn when
    there is one) when the tokenizer has a chat template, else the plain text."""
    token_ids, starts = [], []
    for text in texts:
        if tokenizer.chat_template:
            prompt = template_ids(tokenizer, [{"role": "user", "content": text.prompt}])
            ids = prompt
            if text.response is not None:
                messages = [{"role": "user", "content": text.prompt}, {"role": "assistant", "content": text.response}]
                ids = template_ids(tokenizer, messages, generation_prompt=False)
        else:
            prompt = tokenizer.encode(text.prompt)
            ids = tokenizer.encode(text.prompt + (f" {text.response}" if text.response else ""))
        token_ids.append(ids[:max_length])
        starts.append(min(_common_prefix(prompt, ids), max_length))
    return CalibrationSet(token_ids, starts)


#: a stage of making a pattern reports (stage, steps done, steps in all or None when unknown)
StageProgress = Callable[[str, int, "int | None"], None]


class RecipeError(ValueError):
    """A recipe that cannot be calibrated; `param` names the input at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class PatternRecipe:
    """How to turn statistics into a selection: MoE (keep ratio or count, method, layer budget, refinement)
    or dense (sparsity). Made from user input by `for_model`, which fills the documented defaults."""

    method: str = DEFAULT_MOE_METHOD
    keep_ratio: float | None = DEFAULT_KEEP
    keep_experts: int | None = None
    threshold: float = 0.0
    sparsity: float = 0.2
    seed: int = 0
    budget: str = "uniform"
    refine: str = "none"
    search: SearchOptions = field(default_factory=SearchOptions)
    target: float | None = None  # `--keep auto`: the fewest experts whose held-out answers match this share
    substitute: str = "none"  # what a pruned expert's choice gets: nothing (the router can't choose it), or a novice
    rank: int = DEFAULT_RANK  # a low-rank novice's rank

    @property
    def keep_auto(self) -> bool:
        return self.target is not None

    @classmethod
    def for_model(
        cls,
        moe: bool,
        method: str | None = None,
        keep: float | str | None = None,
        keep_experts: int | None = None,
        threshold: float = 0.0,
        sparsity: float = 0.2,
        seed: int = 0,
        budget: str = "uniform",
        refine: str = "none",
        target: float | None = None,
        substitute: str = "none",
        rank: int | None = None,
    ) -> PatternRecipe:
        """The recipe for user input (the CLI's flags or the admin API's JSON), defaults filled by the model's
        kind (method: reap for MoE, seap for dense; keep `DEFAULT_KEEP` unless a count is given; `keep="auto"`:
        the fewest experts that meet `target`, default `DEFAULT_TARGET`) and validated."""
        auto = keep == KEEP_AUTO
        if isinstance(keep, str) and not auto:
            raise RecipeError(f"keep is a share of the experts in (0, 1] or {KEEP_AUTO!r}, not {keep!r}", "keep")
        if target is not None and not auto:
            raise RecipeError(f"target sets the quality of keep={KEEP_AUTO!r}; give keep={KEEP_AUTO!r} too", "target")
        if rank is not None and substitute != LOW_RANK:
            raise RecipeError(
                f"substitute_rank sets a low-rank novice's rank; give substitute {LOW_RANK!r} too", "substitute_rank"
            )
        recipe = cls(
            method=method or (DEFAULT_MOE_METHOD if moe else "seap"),
            keep_ratio=None if keep_experts or auto else (DEFAULT_KEEP if keep is None else float(keep)),
            keep_experts=keep_experts,
            threshold=threshold,
            sparsity=sparsity,
            seed=seed,
            budget=budget,
            refine=refine,
            target=(DEFAULT_TARGET if target is None else target) if auto else None,
            substitute=substitute,
            rank=DEFAULT_RANK if rank is None else rank,
        )
        recipe.validate(moe)
        return recipe

    def validate(self, moe: bool) -> None:
        """Fail before calibrating (which takes a while) rather than after."""
        methods = MOE_METHODS if moe else DENSE_METHODS
        if self.method not in methods:
            raise RecipeError(
                f"unknown method {self.method!r} for this model; expected one of {', '.join(methods)}", "method"
            )
        if moe and self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise RecipeError("keep must be in (0, 1]", "keep")
        if not moe and not 0 <= self.sparsity < 1:
            raise RecipeError("sparsity must be in [0, 1)", "sparsity")
        if self.budget not in BUDGETS:
            raise RecipeError(f"unknown layer budget {self.budget!r}; expected one of {', '.join(BUDGETS)}", "budget")
        if self.refine not in REFINEMENTS:
            raise RecipeError(f"unknown refinement {self.refine!r}; expected one of {', '.join(REFINEMENTS)}", "refine")
        if moe and self.budget == LOSS_BUDGET and self.refine != "e2e":
            raise RecipeError(f"budget {LOSS_BUDGET!r} is moved by the answer loss: it needs refine 'e2e'", "budget")
        if self.target is not None and not 0 < self.target < 1:
            raise RecipeError("target is the share of held-out answers that must match the full model's, in (0, 1) "
                              "(keep every expert for all of them)", "target")  # fmt: skip
        if self.target is not None and not moe:
            raise RecipeError(f"keep={KEEP_AUTO!r} chooses how many experts to keep; a dense model has none", "keep")
        if self.substitute not in SUBSTITUTES:
            raise RecipeError(
                f"unknown substitute {self.substitute!r}; expected one of {', '.join(SUBSTITUTES)}", "substitute"
            )
        if not moe and self.substitute != "none":
            raise RecipeError("substitute stands in for pruned experts; a dense model has none", "substitute")
        if not 1 <= self.rank <= 1024:
            raise RecipeError(f"a low-rank novice's rank is 1 to 1024, not {self.rank}", "substitute_rank")
        if not moe and (self.refine != "none" or self.budget != "uniform"):
            param = "refine" if self.refine != "none" else "budget"
            raise RecipeError(f"{param} chooses experts; a dense model's pattern has none", param)

    def parameters(self, kind: str) -> dict[str, Any]:
        if kind == "moe_experts":
            return {
                "keep_ratio": self.keep_ratio,
                "keep_experts": self.keep_experts,
                "threshold": self.threshold,
                "budget": self.budget,
                "refine": self.refine,
                "substitute": self.substitute,
                **({"substitute_rank": self.rank} if self.substitute == LOW_RANK else {}),
                **({"keep": KEEP_AUTO, "target": self.target} if self.keep_auto else {}),
            }
        return {"sparsity": self.sparsity}


UNKNOWN_CONTEXT = 2048
"""Calibration texts are cut to the model's context; a config that does not say is taken to have this one."""


def max_context(builder: VariantBuilder) -> int:
    return context_length(builder.config) or UNKNOWN_CONTEXT


def _stage(progress: StageProgress | None, stage: str, total: int | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda done: progress(stage, done, total)


@torch.inference_mode()
def complete_answers(
    model: PreTrainedModel, calibration: CalibrationSet, eos_ids: Sequence[int], max_new_tokens: int = 64
) -> CalibrationSet:
    """Exchanges without an answer get the model's own greedy answer: refinement by answer loss then keeps
    what makes the full model answer as it does."""
    token_ids, starts = [], []
    for ids, start in zip(calibration.token_ids, calibration.answer_starts, strict=True):
        if start < len(ids):
            token_ids.append(list(ids))
            starts.append(start)
            continue
        room = max(0, (context_length(model.config) or UNKNOWN_CONTEXT) - len(ids))
        if room == 0:  # a prompt that fills the context has no room for an answer; it is not scored
            token_ids.append(list(ids))
            starts.append(len(ids))
            continue
        output = model.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=min(max_new_tokens, room),
            do_sample=False,
            eos_token_id=list(eos_ids) or None,
            pad_token_id=eos_ids[0] if eos_ids else None,
        )
        token_ids.append(output[0].tolist())
        starts.append(len(ids))
    return CalibrationSet(token_ids, starts)


def answered_by_full_model(
    builder: VariantBuilder, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 64
) -> list[CalibrationText]:
    """The prompts with the full model's greedy answers as responses: calibration texts for prompts that
    came without answers (recorded traffic), so that the statistics cover the answers too."""
    eos = _eos_ids(builder, tokenizer)
    asked = calibration_set(tokenizer, [CalibrationText(p, None) for p in prompts], max_context(builder))
    answers = _greedy_answers(builder.build(), asked.token_ids, eos, max_new_tokens)
    return [
        CalibrationText(prompt, tokenizer.decode(list(answer), skip_special_tokens=True).strip())
        for prompt, answer in zip(prompts, answers, strict=True)
    ]


def _candidate_methods(stats: CalibrationStatistics) -> list[str]:
    """The scoring methods whose selections the refinements start from (every one the statistics allow)."""
    layer = next(iter(stats.router.values()))
    return [m for m in MOE_METHODS if m != "random" and (m not in OUTPUT_METHODS or layer.has_outputs)]


def select_experts(
    builder: VariantBuilder,
    stats: CalibrationStatistics,
    recipe: PatternRecipe,
    calibration: CalibrationSet | None = None,
    progress: StageProgress | None = None,
) -> tuple[PrunedSelection, dict[str, Any]]:
    """The kept experts of a MoE pattern by `recipe`, and a record of how they were chosen (the pattern's
    document keeps it). Refinements need `calibration`, the token ids the statistics came from."""
    recipe.validate(moe=True)
    layer = next(iter(builder.sparse_layers.values()))
    top_k = int(builder.config.num_experts_per_tok)
    keep = keep_count(layer.num_experts, top_k, recipe.keep_ratio, recipe.keep_experts)
    # with novices the router keeps its own rule over every expert: no group constraint on what is kept
    groups = builder.family.balanced_groups(builder.config) if recipe.substitute == "none" else 1
    # the per-layer counts come from the recipe's method alone; every method's selection keeps those counts,
    # so that refinements compare sets of the same sizes and never spend more than the budget
    counts = expert_counts(stats, keep, recipe.method, recipe.budget, top_k, groups, recipe.seed)

    def by(method: str) -> PrunedSelection:
        return moe_selection(stats, counts, method, recipe.seed, groups)

    chosen = by(recipe.method)
    record: dict[str, Any] = {"experts_per_layer": {str(k): v for k, v in counts.items()}}
    # every expert's novice, when pruned choices get them: the refinements score candidates with them too
    novices = _novice_tables(stats, recipe)
    kept = {index: list(experts) for index, experts in chosen.selection.layers.items()}
    if recipe.refine != "none":
        if calibration is None:
            raise ValueError("refinement needs the calibration token ids")
        started = time.perf_counter()
        methods = _candidate_methods(stats)
        starts = {method: dict(by(method).selection.layers) for method in methods}
        local = refine_locally(
            builder,
            calibration.token_ids,
            starts,
            chosen.scores,
            recipe.search,
            progress=_stage(progress, "layer-local refinement", builder.config.num_hidden_layers),
            novices=novices,
        )
        record["local"] = {
            str(index): {
                "start": search.start,
                "start_error": round(search.start_loss, 6),
                "error": round(search.loss, 6),
                "swaps": search.swaps,
            }
            for index, search in local.items()
        }
        kept = {index: list(search.kept) for index, search in local.items()}
        if recipe.refine == "e2e":
            kept, record["e2e"] = _refine_by_answer_loss(
                builder, calibration, {**starts, "local": kept}, chosen.scores, recipe, progress, novices
            )
            record["experts_per_layer"] = {str(index): len(experts) for index, experts in kept.items()}
        record["seconds"] = round(time.perf_counter() - started, 1)
    return PrunedSelection(_kept_selection(builder, kept, novices), chosen.scores), record


def _novice_tables(stats: CalibrationStatistics, recipe: PatternRecipe) -> dict[int, NoviceTable] | None:
    """Every expert's novice per layer when `recipe` substitutes novices (the refinements score with them)."""
    if recipe.substitute == "none":
        return None
    if recipe.substitute == LOW_RANK:
        missing = [layer for layer, s in stats.router.items() if s.low_rank is None or s.low_rank.rank != recipe.rank]
        if missing:
            raise ValueError(
                f"low-rank novices of rank {recipe.rank} need statistics fitted at that rank (collect_statistics("
                f"..., low_rank={recipe.rank})); layers {missing} have none"
            )
    return {
        index: NoviceTable(s.novices(), s.low_rank if recipe.substitute == LOW_RANK else None)
        for index, s in stats.router.items()
    }


def _kept_selection(
    builder: VariantBuilder, kept: dict[int, list[int]], novices: dict[int, NoviceTable] | None
) -> Selection:
    """The selection of `kept`, with the pruned experts' novices when they get them; without, checked against
    the routing rule now rather than when served."""
    pruned = {
        index: experts for index, experts in kept.items() if len(experts) < builder.sparse_layers[index].num_experts
    }
    if novices is not None:  # the router keeps every expert: any kept set routes, pruned choices get novices
        parts = {index: novices[index].pruned_part(experts) for index, experts in pruned.items()}
        maps = {index: part.low_rank for index, part in parts.items() if part.low_rank is not None}
        # only the pruned layers are named: novices stand in for every layer named, a layer not named keeps all
        return Selection("moe_experts", pruned, novices={i: p.novices for i, p in parts.items()}, low_rank=maps)
    for index, experts in pruned.items():
        builder.family.routing_overrides(builder.config, index, experts)
    return Selection("moe_experts", kept)


def _refine_by_answer_loss(
    builder: VariantBuilder,
    calibration: CalibrationSet,
    candidates: dict[str, Any],
    tiebreak: dict[int, torch.Tensor],
    recipe: PatternRecipe,
    progress: StageProgress | None,
    novices: dict[int, NoviceTable] | None = None,
) -> tuple[dict[int, list[int]], dict[str, Any]]:
    model = builder.build()
    eos = end_of_generation_ids(None, builder.generation_config) or end_of_generation_ids(None, builder.config)
    answered = complete_answers(model, calibration, eos)
    search = refine_by_answer_loss(
        builder,
        answered.token_ids,
        answered.answer_starts,
        candidates,
        tiebreak,
        recipe.search,
        progress=_stage(progress, "answer-loss refinement", recipe.search.e2e_evaluations),
        model=model,
        move_budget=recipe.budget == LOSS_BUDGET,
        novices=novices,
    )
    pairs = zip(calibration.token_ids, calibration.answer_starts, strict=True)
    generated = sum(start >= len(ids) for ids, start in pairs)
    record = {
        "objective": recipe.search.e2e_objective,
        "start": search.start,
        "candidate_losses": {name: _figures(value) for name, value in search.candidate_losses.items()},
        "full_loss": _figures(search.full_loss),
        "start_loss": _figures(search.start_loss),
        "loss": _figures(search.loss),
        "swaps": search.swaps,
        "moves": search.moves,
        "evaluations": search.evaluations,
        "stopped": search.stopped,
        "answers_generated": int(generated),
    }
    return {index: list(experts) for index, experts in search.kept.items()}, record


def _figures(value: float) -> float:
    """Four significant figures: a divergence from the full model can be 1e-6 and still tell selections apart."""
    return float(f"{value:.4g}")


def pattern_coverage(stats: CalibrationStatistics, selection: Selection) -> dict[str, Any]:
    """The kept experts' coverage of the full router's choices on the calibration tokens (`coverage`)."""
    layers = stats.router
    first = next(iter(layers.values()), None)
    answers = (
        {layer: s.answer_mass for layer, s in layers.items()},
        {layer: s.answer_top1 for layer, s in layers.items()},
        first.answer_tokens if first is not None else 0,
    )
    return calibrated_coverage(
        {layer: s.mass for layer, s in layers.items()},
        {layer: s.top1 for layer, s in layers.items()},
        first.tokens if first is not None else 0,
        dict(selection.layers),
        answers,
    )


def pattern_from_statistics(
    name: str,
    builder: VariantBuilder,
    stats: CalibrationStatistics,
    recipe: PatternRecipe,
    examples: Sequence[str],
    embedder: Embedder | None,
    fingerprint: str | None = None,
    calibration: CalibrationSet | None = None,
    progress: StageProgress | None = None,
    selected: tuple[PrunedSelection, dict[str, Any]] | None = None,
) -> TaskPattern:
    """The pattern `stats` make by `recipe` (MoE: `selected`, its experts when already chosen, as `--keep
    auto` does), its examples embedded for routing."""
    validate_name(name)
    parameters = recipe.parameters(stats.kind)
    if stats.kind == "moe_experts":
        pruned, record = (
            selected if selected is not None else select_experts(builder, stats, recipe, calibration, progress)
        )
        parameters["selection"] = record
        parameters["coverage"] = pattern_coverage(stats, pruned.selection)
    else:
        pruned = dense_selection(stats, builder, recipe.sparsity, recipe.method, seed=recipe.seed)
    return TaskPattern(
        name=name,
        selection=pruned.selection,
        scores=pruned.scores,
        method=recipe.method,
        parameters=parameters,
        model_fingerprint=fingerprint or model_fingerprint(builder.model_dir),
        created=time.time(),
        calibration_prompts=stats.prompts,
        examples=list(examples),
        example_embeddings=embedder.embed(list(examples)) if embedder is not None else None,
        model=model_identity(builder.model_dir),
    )


def make_pattern(
    name: str,
    builder: VariantBuilder,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[CalibrationText],
    recipe: PatternRecipe,
    examples: Sequence[str],
    embedder: Embedder | None,
    fingerprint: str | None = None,
    progress: StageProgress | None = None,
) -> tuple[TaskPattern, CalibrationStatistics]:
    """Calibrate, score, select (and refine) and embed: one pattern from its prompts, as the CLI and the admin
    API make them."""
    recipe.validate(builder.family.kind == "moe")
    calibration = calibration_set(tokenizer, texts, max_context(builder))
    if recipe.keep_auto:
        return _auto_kept_pattern(
            name, builder, tokenizer, calibration, recipe, examples, embedder, fingerprint, progress
        )
    stats = _statistics(builder, calibration, recipe, progress)
    pattern = pattern_from_statistics(
        name, builder, stats, recipe, examples, embedder, fingerprint, calibration, progress
    )
    return pattern, stats


def _auto_kept_pattern(
    name: str,
    builder: VariantBuilder,
    tokenizer: PreTrainedTokenizerBase,
    calibration: CalibrationSet,
    recipe: PatternRecipe,
    examples: Sequence[str],
    embedder: Embedder | None,
    fingerprint: str | None,
    progress: StageProgress | None,
) -> tuple[TaskPattern, CalibrationStatistics]:
    """`--keep auto`: statistics on the prompts not held out, then the fewest experts whose answers to the
    held-out prompts match the full model's at least `recipe.target` of the time (`keep_search`)."""
    held = set(held_out_indices(len(calibration.token_ids), recipe.target))
    pairs = list(zip(calibration.token_ids, calibration.answer_starts, strict=True))
    fit = CalibrationSet([ids for i, (ids, _) in enumerate(pairs) if i not in held],
                         [start for i, (_, start) in enumerate(pairs) if i not in held])  # fmt: skip
    prompts = [ids[:start] for i, (ids, start) in enumerate(pairs) if i in held]
    stats = _statistics(builder, fit, recipe, progress)
    eos = _eos_ids(builder, tokenizer)
    reference = _greedy_answers(builder.build(), prompts, eos)
    layer = next(iter(builder.sparse_layers.values()))
    counts = candidate_counts(layer.num_experts, int(builder.config.num_experts_per_tok),
                              builder.family.balanced_groups(builder.config))  # fmt: skip

    def evaluate(count: int) -> tuple[PrunedSelection, dict[str, Any], int]:
        fixed = dataclasses.replace(recipe, keep_ratio=None, keep_experts=count, target=None)
        pruned, record = select_experts(builder, stats, fixed, fit)
        answers = _greedy_answers(builder.build(pruned.selection), prompts, eos)
        return pruned, record, matches(answers, reference)

    pruned, record, search = search_keep(
        counts, evaluate, float(recipe.target or 1.0), len(prompts),
        progress=(lambda done, total: progress("keep search", done, total)) if progress is not None else None,
    )  # fmt: skip
    if pruned is None:  # only every expert meets the target: the pattern keeps them all
        every = dataclasses.replace(recipe, keep_ratio=None, keep_experts=search.experts, target=None, refine="none")
        pruned, record = select_experts(builder, stats, every, fit)
    pattern = pattern_from_statistics(
        name, builder, stats, recipe, examples, embedder, fingerprint, fit, progress, selected=(pruned, record)
    )
    pattern.parameters["keep_experts"] = search.experts
    pattern.parameters["keep_search"] = search.record()
    return pattern, stats


def _statistics(
    builder: VariantBuilder, calibration: CalibrationSet, recipe: PatternRecipe, progress: StageProgress | None
) -> CalibrationStatistics:
    """The calibration pass over `calibration` (its answers' tokens marked, for their coverage; every expert's
    low-rank novice fitted when the recipe substitutes them)."""
    return collect_statistics(
        builder,
        calibration.token_ids,
        threshold=recipe.threshold,
        progress=_stage(progress, "statistics", builder.config.num_hidden_layers),
        answer_starts=calibration.answer_starts,
        low_rank=recipe.rank if recipe.substitute == LOW_RANK and builder.family.kind == "moe" else None,
    )


def _eos_ids(builder: VariantBuilder, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's and generation config's, else the model config's."""
    return end_of_generation_ids(tokenizer, builder.generation_config) or end_of_generation_ids(None, builder.config)


def _greedy_answers(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], eos: Sequence[int], max_new_tokens: int = 64
) -> list[tuple]:
    """Each prompt's greedy answer as token ids, its end-of-generation token left out (`complete_answers`, one
    prompt at a time: no padding can change an answer)."""
    prompted = CalibrationSet([list(p) for p in prompts], [len(p) for p in prompts])
    answered = complete_answers(model, prompted, eos, max_new_tokens)
    return [
        tuple(token for token in ids[start:] if token not in eos)
        for ids, start in zip(answered.token_ids, answered.answer_starts, strict=True)
    ]


def measure_coverage(
    pattern: TaskPattern,
    builder: VariantBuilder,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[CalibrationText] | None = None,
    progress: Callable[[int], None] | None = None,
    answer: bool = False,
) -> dict[str, Any]:
    """The coverage of a stored MoE pattern's kept experts on `texts` (default: its example prompts), run
    through the full model: what calibration records now, for patterns made before it did. Texts with a
    response also give the answers' coverage; `answer`: the full model answers those without one first
    (the whole model in memory), so that every text gives it."""
    if pattern.kind != "moe_experts":
        raise ValueError(f"pattern {pattern.name!r} keeps dense channels: coverage is a MoE pattern's figure")
    texts = list(texts) if texts is not None else [CalibrationText(example, None) for example in pattern.examples]
    if not texts:
        raise ValueError(f"pattern {pattern.name!r} has no example prompts: give prompts to measure on")
    unanswered = [text.prompt for text in texts if text.response is None]
    if answer and unanswered:
        answered = iter(answered_by_full_model(builder, tokenizer, unanswered))
        texts = [next(answered) if text.response is None else text for text in texts]
    calibration = calibration_set(tokenizer, texts, max_context(builder))
    stats = collect_statistics(
        builder, calibration.token_ids, progress=progress, answer_starts=calibration.answer_starts
    )
    return pattern_coverage(stats, pattern.selection)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir))
