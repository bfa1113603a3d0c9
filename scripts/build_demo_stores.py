"""Build the demo pattern stores that ship with the demo models: one pattern per demo task and a general one.

    python scripts/build_demo_stores.py                  # models/demo-moe/patterns and models/demo-dense/patterns

Each task pattern is calibrated on 64 generated prompts of its task with their answers (a seed that is
neither the training stream's nor the held-out evaluation's) and routes on the same prompts. The general
pattern is calibrated on all tasks' prompts together and has no routing examples: it is what a server can
fall back to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore
from server.demo.tasks import TASKS
from server.model.pruning import model_fingerprint
from server.model.variant import VariantBuilder
from server.patterns import (
    CalibrationText,
    PatternRecipe,
    calibration_statistics,
    load_tokenizer,
    pattern_from_statistics,
)

CALIBRATION_SEED = 7_000
GENERAL = "general"


def build_store(model_dir: Path, recipe: PatternRecipe, prompts_per_task: int, embedder: Embedder) -> PatternStore:
    store_dir = model_dir / "patterns"
    if store_dir.exists():
        shutil.rmtree(store_dir)
    store = PatternStore(store_dir)
    builder = VariantBuilder(model_dir, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    fingerprint = model_fingerprint(model_dir)
    pooled = None
    for task in tqdm(TASKS, desc=f"{model_dir.name} patterns", unit="task"):
        examples = task.examples(prompts_per_task, CALIBRATION_SEED)
        prompts = [e.prompt for e in examples]
        texts = [CalibrationText(e.prompt, e.answer) for e in examples]
        stats = calibration_statistics(builder, tokenizer, texts, recipe.threshold)
        pooled = stats if pooled is None else pooled.merge(stats)
        store.add(pattern_from_statistics(task.name, builder, stats, recipe, prompts, embedder, fingerprint))
    assert pooled is not None
    store.add(pattern_from_statistics(GENERAL, builder, pooled, recipe, [], None, fingerprint))
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--prompts-per-task", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5, help="demo-moe: share of experts kept (default 0.5)")
    parser.add_argument("--sparsity", type=float, default=0.2, help="demo-dense: channel sparsity (default 0.2)")
    args = parser.parse_args(argv)
    embedder = Embedder()
    for name, recipe in (
        ("demo-moe", PatternRecipe(method="tcess", keep_ratio=args.keep)),
        ("demo-dense", PatternRecipe(method="seap", sparsity=args.sparsity)),
    ):
        store = build_store(args.models / name, recipe, args.prompts_per_task, embedder)
        print(f"{args.models / name / 'patterns'}: {', '.join(store.names())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
