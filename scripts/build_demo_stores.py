"""Build the demo pattern stores that ship with the demo models: one pattern per demo task and a general one.

    python scripts/build_demo_stores.py                       # every demo model under models/
    python scripts/build_demo_stores.py --only demo-moe-fine  # one of them

Each task pattern is calibrated on 64 generated prompts of its task with their answers (a seed that is
neither the training stream's nor the held-out evaluation's) and routes on the same prompts. MoE patterns
use the recipe chosen on a choice split (seed 8100, neither calibration's nor the evaluation's): REAP scores,
then the answer-loss refinement (the divergence from the full model) with the layer budget moved by it; dense
patterns SEAP at 20% sparsity. The general pattern is calibrated (and
refined) on all tasks' prompts together and has no routing examples: it is what a server can fall back to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from demo.calibration import calibration_texts
from demo.tasks import TASKS
from pattern_store.embedder import Embedder
from pattern_store.recipes import BUDGETS, REFINEMENTS
from pattern_store.store import PatternStore
from server.model.calibrate import collect_statistics
from server.model.checkpoint import model_fingerprint
from server.model.variant import VariantBuilder
from server.patterns import (
    CalibrationSet,
    PatternRecipe,
    calibration_set,
    load_tokenizer,
    max_context,
    pattern_from_statistics,
)

GENERAL = "general"
MODELS = ("demo-moe", "demo-moe-fine", "demo-dense")


def build_store(model_dir: Path, recipe: PatternRecipe, prompts_per_task: int, embedder: Embedder) -> PatternStore:
    store_dir = model_dir / "patterns"
    if store_dir.exists():
        shutil.rmtree(store_dir)
    store = PatternStore(store_dir)
    builder = VariantBuilder(model_dir, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    fingerprint = model_fingerprint(model_dir)
    pooled_stats, pooled_ids, pooled_starts = None, [], []
    for task in tqdm(TASKS, desc=f"{model_dir.name} patterns", unit="task"):
        started = time.perf_counter()
        texts = calibration_texts(task.name, prompts_per_task)
        prompts = [text.prompt for text in texts]
        calibration = calibration_set(tokenizer, texts, max_context(builder))
        stats = collect_statistics(
            builder, calibration.token_ids, threshold=recipe.threshold, answer_starts=calibration.answer_starts
        )
        pooled_stats = stats if pooled_stats is None else pooled_stats.merge(stats)
        pooled_ids += calibration.token_ids
        pooled_starts += calibration.answer_starts
        pattern = pattern_from_statistics(
            task.name, builder, stats, recipe, prompts, embedder, fingerprint, calibration
        )
        store.add(pattern)
        tqdm.write(f"  {task.name}: {time.perf_counter() - started:.0f} s")
    assert pooled_stats is not None
    pooled = CalibrationSet(pooled_ids, pooled_starts)
    store.add(pattern_from_statistics(GENERAL, builder, pooled_stats, recipe, [], None, fingerprint, pooled))
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--only", choices=MODELS, help="build one model's store")
    parser.add_argument("--prompts-per-task", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5, help="MoE: share of experts kept (default 0.5)")
    parser.add_argument("--refine", choices=REFINEMENTS, default="e2e", help="MoE refinement (default e2e)")
    parser.add_argument("--budget", choices=BUDGETS, default="loss", help="MoE layer budget (default loss)")
    parser.add_argument("--sparsity", type=float, default=0.2, help="demo-dense: channel sparsity (default 0.2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    embedder = Embedder()
    for name in MODELS:
        if args.only not in (None, name) or not (args.models / name).is_dir():
            continue
        if name == "demo-dense":
            recipe = PatternRecipe(method="seap", sparsity=args.sparsity)
        else:
            recipe = PatternRecipe(method="reap", keep_ratio=args.keep, refine=args.refine, budget=args.budget)
        store = build_store(args.models / name, recipe, args.prompts_per_task, embedder)
        print(f"{args.models / name / 'patterns'}: {', '.join(store.names())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
