"""Where a pattern loses: the layers and experts whose pruning turns the full model's right answers wrong.

    python scripts/diagnose_pattern.py [--model models/demo-moe] [--task translate] [-n 200]

The stored pattern and the full model answer `-n` prompts of a diagnosis seed (neither the calibration seed
nor the evaluation seed). On the prompts the full model answers right and the pattern wrong, each sparse
layer in turn gets every expert back (the pattern elsewhere): how many of those answers that repairs says
where the loss sits. In the layer that repairs most, each pruned expert is given back alone; and for the
experts that repair most, their calibration statistics say why the selection dropped them (their REAP
score's rank among the layer's experts, how often the full router chose them on the calibration tokens).
Writes `bench/results/diagnosis_TASK.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv: list[str] | None = None) -> int:
    from demo.calibration import calibration_texts
    from demo.evaluate import greedy_answers
    from demo.tasks import CHOICE_SEED, get_task
    from pattern_store.selection import Selection
    from pattern_store.store import PatternStore
    from server.model.calibrate import collect_statistics
    from server.model.variant import VariantBuilder
    from server.patterns import calibration_set, load_tokenizer, max_context

    from _measured import measured

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("--task", default="translate")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    builder = VariantBuilder(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    task = get_task(args.task)
    examples = task.examples(args.n, CHOICE_SEED)
    prompts = [e.prompt for e in examples]
    kept = {
        layer: list(experts)
        for layer, experts in PatternStore(args.model / "patterns").get(args.task).selection.layers.items()
    }

    def right(selection: dict[int, list[int]] | None, chosen: list[int]) -> list[bool]:
        model = builder.build(Selection("moe_experts", selection) if selection else None)
        answers = greedy_answers(model, tokenizer, [prompts[i] for i in chosen], max_new_tokens=64)
        return [bool(task.score(examples[i], answer)) for i, answer in zip(chosen, answers, strict=True)]

    everything = list(range(len(examples)))
    full, pattern = right(None, everything), right(kept, everything)
    failing = [i for i in everything if full[i] and not pattern[i]]
    report: dict[str, Any] = {
        "model": args.model.name, "task": args.task, "n": args.n, "seed": CHOICE_SEED,
        "full_right": sum(full), "pattern_right": sum(pattern), "failing": len(failing),
        "kept_per_layer": {str(layer): len(experts) for layer, experts in kept.items()},
    }  # fmt: skip
    print(f"{args.task}: full {sum(full)}/{args.n}, pattern {sum(pattern)}/{args.n}, {len(failing)} lost answers")
    layers = sorted(kept)
    report["layer_repairs"] = {}
    for layer in layers:  # every expert back in one layer
        whole = builder.sparse_layers[layer].num_experts
        repaired = sum(right({**kept, layer: list(range(whole))}, failing)) if failing else 0
        report["layer_repairs"][str(layer)] = repaired
        print(f"  layer {layer}: every expert back repairs {repaired} of {len(failing)}")
    worst = max(layers, key=lambda layer: report["layer_repairs"][str(layer)])
    calibration = calibration_set(tokenizer, calibration_texts(args.task, 64), max_context(builder))
    stats = collect_statistics(builder, calibration.token_ids, answer_starts=calibration.answer_starts).router[worst]
    scores = stats.scores("reap")
    ranks = {int(expert): rank for rank, expert in enumerate(scores.argsort(descending=True).tolist())}
    experts = []
    for expert in range(builder.sparse_layers[worst].num_experts):
        if expert in kept[worst] or not failing:
            continue
        repaired = sum(right({**kept, worst: sorted([*kept[worst], expert])}, failing))
        experts.append({
            "expert": expert, "repairs": repaired, "reap_rank": ranks[expert] + 1,
            "chosen_share": round(float(stats.frequency[expert]) / max(stats.tokens, 1), 4),
            "answer_mass_share": round(float(stats.answer_mass[expert]) / max(stats.answer_tokens, 1), 4),
        })  # fmt: skip
    experts.sort(key=lambda entry: -entry["repairs"])
    report["layer"] = worst
    report["expert_repairs"] = experts
    kept_ranks = sorted(ranks[e] + 1 for e in kept[worst])
    report["kept_reap_ranks"] = kept_ranks
    for entry in experts[:5]:
        print(f"  layer {worst}, expert {entry['expert']} back: repairs {entry['repairs']}; REAP rank "
              f"{entry['reap_rank']}, chosen for {100 * entry['chosen_share']:.1f}% of calibration tokens, "
              f"{100 * entry['answer_mass_share']:.1f}% of the answers' gate mass")  # fmt: skip
    report["measured"] = measured()
    out = args.out or ROOT / "bench" / "results" / f"diagnosis_{args.task}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
