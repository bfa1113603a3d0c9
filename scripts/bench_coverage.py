"""What live coverage sampling costs: tokens/s at 32 clients with `--coverage-rate 0` and with the default.

    python scripts/bench_coverage.py [--rounds 5] [--out bench/results/coverage_cost.json]

Two `taskmoe serve` processes on the demo MoE (the expert pool), one with coverage sampling off and one with
the shipped default rate, both up for the whole run; the load generator of `scripts/bench_server.py` sends
one pattern and three patterns mixed at 32 clients to each in turn, alternating which goes first each
round, so that the machine's drift falls on both. Target: sampling costs at most 3% of tokens/s (the
ratio of the medians at least 0.97). The servers' ratio moves by +-10% from round to round on this shared
machine, so the script also times decode steps in process (one pattern, batch 32, steps with and without
sampling taken in turn): the extra time of a sampled step, times the rate, is the cost without the noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TARGET = 0.97
CLIENTS = 32


def step_cost(model_dir: Path, batch: int = CLIENTS, steps: int = 40) -> dict[str, float]:
    """In process, where the server's load noise is absent: decode steps of one pattern at `batch` rows
    without a meter and with every step sampled, taken in turn; the extra time of a sampled step, and what
    it costs at the default rate."""
    import time

    import torch

    from pattern_store.store import PatternStore
    from server.config import ServerConfig
    from server.model.coverage_meter import CoverageMeter
    from server.model.kv_cache import cache_argument, new_cache
    from server.model.pooled import PooledModel, RowRoute
    from server.model.variant import VariantBuilder

    torch.set_num_threads(1)
    builder = VariantBuilder(model_dir, device="cpu", dtype="float32")
    pooled = PooledModel(builder, slots=max(layer.num_experts for layer in builder.sparse_layers.values()))
    for layer, sparse in pooled.layers.items():
        pooled.load(layer, list(range(sparse.num_experts)), list(range(sparse.num_experts)))
        for expert in range(sparse.num_experts):
            pooled.place(layer, expert, expert)
    selection = PatternStore(model_dir / "patterns").get("sort").selection
    route = RowRoute("sort", builder.kept_experts(selection), "r", 0.8)
    meter = CoverageMeter(rate=1.0, tolerance=0.05)
    ids = torch.randint(3, 60, (batch, 16), generator=torch.Generator().manual_seed(0))
    caches = {mode: new_cache(builder.config) for mode in ("off", "sampled")}
    tokens = {}
    seconds: dict[str, list[float]] = {"off": [], "sampled": []}
    with torch.inference_mode():
        for mode, cache in caches.items():
            with pooled.rows([route] * batch):
                out = pooled.model(input_ids=ids, **cache_argument(pooled.model, cache))
            tokens[mode] = out.logits[:, -1:].argmax(-1)
        for step in range(steps + 5):
            for mode, cache in caches.items():
                pooled.coverage = meter if mode == "sampled" else None
                started = time.perf_counter()
                with pooled.rows([route] * batch):
                    out = pooled.model(input_ids=tokens[mode], **cache_argument(pooled.model, cache))
                tokens[mode] = out.logits[:, -1:].argmax(-1)
                if step >= 5:
                    seconds[mode].append(time.perf_counter() - started)
    pooled.coverage = None
    off, sampled = statistics.median(seconds["off"]), statistics.median(seconds["sampled"])
    rate = ServerConfig.model_fields["coverage_rate"].default
    return {
        "batch": batch,
        "step_ms": 1e3 * off,
        "sampled_step_ms": 1e3 * sampled,
        "extra_ms": 1e3 * (sampled - off),
        "cost_at_default_rate": rate * (sampled - off) / off,
    }


def main(argv: list[str] | None = None) -> int:
    import bench_server as bench

    from demo.evaluate import EVAL_SEED
    from demo.tasks import get_task
    from server.config import ServerConfig

    from _measured import measured

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=512, help="requests of a level (about 9 s here)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "coverage_cost.json")
    args = parser.parse_args(argv)
    rate = ServerConfig.model_fields["coverage_rate"].default
    prompts = [e.prompt for task in bench.TASKS for e in get_task(task).examples(8, EVAL_SEED + 1)]
    scenarios = {"one pattern": bench.ONE_PATTERN, "three patterns": bench.THREE_PATTERNS}
    rows: list[dict[str, Any]] = []
    off_options, on_options = ["--coverage-rate", "0"], ["--coverage-rate", str(rate)]
    with (
        bench.serving(args.model, "4GiB", 1, None, off_options) as off,
        bench.serving(args.model, "4GiB", 1, None, on_options) as on,
    ):
        urls = {"off": off, "on": on}
        for url in urls.values():  # every pattern leased and every path run before anything is timed
            bench.summarise_load(bench.run_generator(bench.load_spec(url, bench.THREE_PATTERNS, prompts, 8, 32, False)))
        for round_ in range(args.rounds):
            order = ["off", "on"] if round_ % 2 == 0 else ["on", "off"]
            for scenario, models in scenarios.items():
                for mode in order:
                    spec = bench.load_spec(urls[mode], models, prompts, CLIENTS, args.requests, False)
                    level = bench.summarise_load(bench.run_generator(spec))
                    rows.append({"round": round_, "scenario": scenario, "coverage": mode, **level})
                    print(f"  round {round_} {scenario} coverage {mode}: {level['tokens_per_second']:,.0f} tokens/s",
                          file=sys.stderr, flush=True)  # fmt: skip
    ratios = {}
    for scenario in scenarios:
        speed = {
            mode: [r["tokens_per_second"] for r in rows if r["scenario"] == scenario and r["coverage"] == mode]
            for mode in ("off", "on")
        }
        ratios[scenario] = {
            "off_median": statistics.median(speed["off"]),
            "on_median": statistics.median(speed["on"]),
            "ratio": statistics.median(speed["on"]) / statistics.median(speed["off"]),
            "per_round": [b / a for a, b in zip(speed["off"], speed["on"], strict=True)],
            "met": statistics.median(speed["on"]) / statistics.median(speed["off"]) >= TARGET,
        }
    steps = step_cost(args.model)
    report = {"rate": rate, "clients": CLIENTS, "rounds": args.rounds, "levels": rows, "ratios": ratios,
              "step": steps, "target": TARGET, "measured": measured()}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"| scenario, 32 clients | coverage off, tokens/s | on (rate {rate:.2f}) | on / off | per round |")
    print("|---|---|---|---|---|")
    for scenario, entry in ratios.items():
        rounds = ", ".join(f"{value:.3f}" for value in entry["per_round"])
        print(
            f"| {scenario} | {entry['off_median']:,.0f} | {entry['on_median']:,.0f} | {entry['ratio']:.3f} | {rounds} |"
        )
    print(
        f"in process, batch {steps['batch']}: a step {steps['step_ms']:.2f} ms, a sampled step "
        f"{steps['sampled_step_ms']:.2f} ms; at rate {rate}: {100 * steps['cost_at_default_rate']:.2f}% of the time"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
