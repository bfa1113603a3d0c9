"""Routing on real benchmark prompts, with the server's defaults: how often a query is served by its own
task's pattern (or a union containing it), by a wrong one, or by the fallback; and, leaving one task out
of the store at a time, how often a query of a task with no pattern lands on a wrong single pattern.

    python scripts/eval_routing.py [--data data/tasks] [--examples 64] [--offset 0]

For each task file, prompts `offset .. offset+examples` are the pattern's routing examples (stored in a
real pattern store); all the others are queries, which nothing here tunes on. Every decision goes through
`server.routing.Router` with the defaults of `taskmoe serve` (`RoutingPolicy`). Also measured on the same
queries: the router without the n-gram features, without unions, and the first round's rule (a cut on the
nearest example's similarity), and the one-stage router that embeds every query (`--route-ngram-gate 1`):
how often the served router's n-gram stage decides without embedding, and how often the one-stage router
serves the same. A decision's latency (p50, p90 of 20 queries a task, one torch thread as served) is
measured for both. Writes bench/results/routing.json and the confusion matrix as a PNG
(docs/images/routing-confusion.png) and prints a table; `scripts/render_docs.py` renders them into
`docs/benchmarks-routing.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from pattern_store.embedder import Embedder
from pattern_store.pattern import TaskPattern
from pattern_store.selection import Selection, union
from pattern_store.store import PatternStore
from server.config import RoutingPolicy
from server.plots import kept_pairs, layer_widths, plot_confusion
from server.route_features import FeatureWeights, RouteFeatures
from server.routing import RouteDecision, Router

from _measured import measured

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "tasks"  # vendored from the shared notes
DEFAULTS = RoutingPolicy()
SERVED = "served (defaults)"
TARGETS = {"wrong_max": 2.0, "served_min": 93.0, "fallback_max": 5.0, "loto_wrong_single_max": 35.0, "p50_ms_max": 5.0}
ONE_STAGE = "one stage (every query embedded)"


def load_tasks(data: Path) -> dict[str, list[str]]:
    tasks: dict[str, list[str]] = {}
    for file in sorted(data.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                tasks.setdefault(record["task"], []).append(record["prompt"])
    if not tasks:
        raise SystemExit(f"{data}: no task files (*.jsonl)")
    return tasks


def routing_store(root: Path, examples: dict[str, torch.Tensor], texts: dict[str, list[str]]) -> PatternStore:
    """A real store with one pattern per task; the selection is a placeholder of the right shape, since
    routing is what is measured here (the patterns could share the demo model's scores)."""
    store = PatternStore(root)
    for task, vectors in examples.items():
        store.add(
            TaskPattern(
                name=task,
                selection=Selection("moe_experts", {0: [0, 1]}),
                scores={0: torch.ones(2)},
                method="routing-only",
                parameters={},
                model_fingerprint="routing-benchmark",
                created=time.time(),
                calibration_prompts=len(texts[task]),
                examples=texts[task],
                example_embeddings=vectors,
            )
        )
    return store


def server_router(store: PatternStore, embedder: Embedder, **overrides) -> Router:
    """The router `taskmoe serve` makes (its routing policy's defaults), with some settings overridden."""
    return Router(store, embedder, policy=DEFAULTS, **overrides)


def seconds(call, *args) -> float:
    begin = time.perf_counter()
    call(*args)
    return time.perf_counter() - begin


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def stage_agreement(served: list[RouteDecision], one_stage: list[RouteDecision]) -> dict[str, float]:
    """How often the two-stage router serves what the one-stage router serves (%), among all the queries and
    among those the n-gram stage decided."""
    first = [(a, b) for a, b in zip(served, one_stage, strict=True) if a.by_ngrams]
    return {
        "all": round(
            100 * sum(a.patterns == b.patterns for a, b in zip(served, one_stage, strict=True)) / len(served), 2
        ),
        "on_first_stage": round(100 * sum(a.patterns == b.patterns for a, b in first) / max(1, len(first)), 2),
    }


def outcome(truth: str, patterns: tuple[str, ...]) -> str:
    if not patterns:
        return "fallback"
    if truth in patterns:
        return "own" if len(patterns) == 1 else "union"
    return "wrong" if len(patterns) == 1 else "wrong-union"


def shares(outcomes: list[str]) -> dict[str, float]:
    counts = Counter(outcomes)
    return {k: round(100 * counts[k] / len(outcomes), 2) for k in ("own", "union", "wrong", "wrong-union", "fallback")}


def union_sizes(store_dir: Path) -> dict[str, float]:
    """Per pair of a demo store's patterns, the share of the routed experts (or channels) their union keeps,
    next to each pattern's own share: what serving a union costs over a single pattern."""
    store = PatternStore(store_dir, create=False)
    patterns = {name: store.get(name) for name in store.names()}

    def kept_share(selection: Selection, widths: dict[int, int]) -> float:
        return round(100 * len(kept_pairs(selection, widths)) / sum(widths.values()), 1)

    out: dict[str, float] = {}
    names = sorted(patterns)
    for i, a in enumerate(names):
        widths = layer_widths(patterns[a])
        out[a] = kept_share(patterns[a].selection, widths)
        for b in names[i + 1 :]:
            out[f"{a}+{b}"] = kept_share(union([patterns[a].selection, patterns[b].selection]), widths)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=64, help="routing examples per task (default 64)")
    parser.add_argument("--offset", type=int, default=0, help="the examples start at this prompt (default 0)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing.json"))
    parser.add_argument("--confusion", type=Path, default=Path("docs/images/routing-confusion.png"))
    parser.add_argument(
        "--demo-stores",
        type=Path,
        nargs="*",
        default=[Path("models/demo-moe/patterns"), Path("models/demo-dense/patterns")],
        help="stores whose unions' sizes are reported (default: the demo models')",
    )
    args = parser.parse_args(argv)

    stamp = measured()  # before the run: the code that runs is the code at that commit
    tasks = load_tasks(args.data)
    names = sorted(tasks)
    embedder = Embedder()
    window = slice(args.offset, args.offset + args.examples)
    example_texts = {t: tasks[t][window] for t in names}
    query_texts = {t: tasks[t][: args.offset] + tasks[t][args.offset + args.examples :] for t in names}
    started = time.perf_counter()
    example_vectors = {t: embedder.embed(example_texts[t]) for t in tqdm(names, desc="embedding examples")}
    query_vectors = {t: embedder.embed(query_texts[t]) for t in tqdm(names, desc="embedding queries")}
    embed_seconds = time.perf_counter() - started
    truth = [t for t in names for _ in query_texts[t]]
    all_texts = [q for t in names for q in query_texts[t]]
    all_vectors = torch.cat([query_vectors[t] for t in names])

    variants = {
        "served (defaults)": {},
        ONE_STAGE: {"ngram_gate": 1.0},
        "no unions": {"union": 1},
        "no n-gram features": {"features": RouteFeatures(FeatureWeights(topic=1.0, content=0.0, form=0.0))},
        "no out-of-store check": {"novelty": 0.0},
    }
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = routing_store(Path(tmp), example_vectors, example_texts)
        served_decisions = []
        for label, overrides in variants.items():
            router = server_router(store, embedder, **overrides)
            learn_started = time.perf_counter()
            router.learn()
            learn_seconds = time.perf_counter() - learn_started
            decisions = router.route_texts(all_texts, all_vectors)
            outcomes = [outcome(t, d.patterns) for t, d in zip(truth, decisions, strict=True)]
            per_task = {}
            for t in names:
                row = shares([o for o, u in zip(outcomes, truth, strict=True) if u == t])
                per_task[t] = round(row["own"] + row["union"], 2)
            results[label] = {**shares(outcomes), "served_by_own_or_union": per_task, "learn_seconds": learn_seconds}
            results[label]["first_stage"] = round(100 * sum(d.by_ngrams for d in decisions) / len(truth), 2)
            if label == "served (defaults)":
                served_decisions, served_router = decisions, router
            if label == ONE_STAGE:
                one_stage_decisions, one_stage_router = decisions, router
        agreement = stage_agreement(served_decisions, one_stage_decisions)

        # the first round's rule, for comparison: a classifier on embeddings, a cut on nearest similarity 0.3
        # the classifier's pick for every query (threshold ~0, no unions, no novelty); the similarity cut decides
        first_round = server_router(
            store, embedder, features=variants["no n-gram features"]["features"], union=1, threshold=1e-9, novelty=0.0
        )
        old = []
        for t, d, v in zip(truth, first_round.route_embedded(all_texts, all_vectors), all_vectors, strict=True):
            nearest = store.search(v, k=1)
            old.append(outcome(t, d.patterns if nearest and nearest[0].score >= 0.3 else ()))
        results["first round (similarity cut 0.3)"] = shares(old)

        # `taskmoe serve` runs torch with one intra-op thread per worker on the CPU: that is what users get;
        # a completion's decision searches no example index (similarity=False), only /v1/route's does
        timed = [q for t in names for q in query_texts[t][:20]]
        timed_vectors = embedder.embed(timed)
        threads = torch.get_num_threads()
        timings_by_threads: dict[int, list[float]] = {}
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            timings_by_threads[count] = [seconds(served_router.route, text, False) for text in timed]
        torch.set_num_threads(1)
        one_stage_timings = [seconds(one_stage_router.route, text, False) for text in timed]
        # the full router's own part of a decision (features, probabilities, typicality, search): what is
        # left of an embedded query's decision when the embedding is known
        deciding = [
            seconds(served_router.route_embedded, [text], vector[None])
            for text, vector in zip(timed, timed_vectors, strict=True)
        ]
        torch.set_num_threads(threads)
        timings = timings_by_threads[1]

    # unions: which, how often, and how much of the model they keep is for the served store to say
    unions = Counter("+".join(d.patterns) for d in served_decisions if len(d.patterns) > 1)
    reasons = Counter(d.reason for d in served_decisions)
    columns = [*names, "union", "full"]
    confusion = [[0] * len(columns) for _ in names]
    for t, d in zip(truth, served_decisions, strict=True):
        column = "full" if not d.patterns else ("union" if len(d.patterns) > 1 else d.patterns[0])
        confusion[names.index(t)][columns.index(column)] += 1
    plot_confusion(
        confusion,
        names,
        columns,
        args.confusion,
        f"Routing {len(truth)} unseen benchmark prompts ({args.examples} examples per task, server defaults)",
    )

    # leave one task out: its queries have no pattern; a single wrong pattern is the harm
    loto: dict[str, dict[str, float]] = {}
    loto_one_stage: dict[str, float] = {}
    for absent in tqdm(names, desc="leave one task out"):
        kept = [t for t in names if t != absent]
        with tempfile.TemporaryDirectory() as tmp:
            store = routing_store(Path(tmp), {t: example_vectors[t] for t in kept}, {t: example_texts[t] for t in kept})
            router = server_router(store, embedder)
            decisions = router.route_texts(query_texts[absent], query_vectors[absent])
            one_stage = router.route_embedded(query_texts[absent], query_vectors[absent])
        where = Counter(
            "fallback" if not d.patterns else ("union" if len(d.patterns) > 1 else "single") for d in decisions
        )
        loto[absent] = {k: round(100 * where[k] / len(decisions), 2) for k in ("single", "union", "fallback")}
        loto[absent]["most_to"] = Counter(d.patterns[0] for d in decisions if len(d.patterns) == 1).most_common(1)
        loto_one_stage[absent] = round(100 * sum(len(d.patterns) == 1 for d in one_stage) / len(one_stage), 2)
    loto_mean = round(statistics.mean(v["single"] for v in loto.values()), 2)

    served = results["served (defaults)"]
    p50 = round(1000 * statistics.median(timings), 2)
    p90 = round(1000 * percentile(timings, 90), 2)
    met = {
        "wrong routes <= 2%": served["wrong"] + served["wrong-union"] <= TARGETS["wrong_max"],
        "own or union >= 93%": served["own"] + served["union"] >= TARGETS["served_min"],
        "full fallback <= 5%": served["fallback"] <= TARGETS["fallback_max"],
        "leave-one-task-out wrong single <= 35%": loto_mean <= TARGETS["loto_wrong_single_max"],
        "routing p50 <= 5 ms": p50 <= TARGETS["p50_ms_max"],
    }
    report = {
        "settings": {
            "examples_per_task": args.examples,
            "offset": args.offset,
            "queries": len(truth),
            "tasks": names,
            "route_threshold": DEFAULTS.threshold,
            "route_union": DEFAULTS.union,
            "route_novelty": DEFAULTS.novelty,
            "route_rule": DEFAULTS.rule,
            "route_ngram_gate": DEFAULTS.ngram_gate,
        },
        "embedder": embedder.model_id,
        "embed_seconds": round(embed_seconds, 1),
        "route_ms_p50": p50,
        "route_ms_p90": p90,
        "one_stage_route_ms": {
            "p50": round(1000 * statistics.median(one_stage_timings), 2),
            "p90": round(1000 * percentile(one_stage_timings, 90), 2),
        },
        "first_stage_agreement": agreement,
        "route_ms_p50_by_threads": {n: round(1000 * statistics.median(t), 2) for n, t in timings_by_threads.items()},
        "decide_ms_p50": round(1000 * statistics.median(deciding), 2),
        "results": results,
        "reasons": dict(reasons),
        "unions": dict(unions.most_common()),
        "confusion": {"rows": names, "columns": columns, "counts": confusion},
        "leave_one_task_out": loto,
        "leave_one_task_out_wrong_single_mean": loto_mean,
        "leave_one_task_out_one_stage": loto_one_stage,
        "leave_one_task_out_one_stage_wrong_single_mean": round(statistics.mean(loto_one_stage.values()), 2),
        "targets": {k: bool(v) for k, v in met.items()},
        "union_kept_percent": {str(d): union_sizes(d) for d in args.demo_stores if (d / "patterns").is_dir()},
        "measured": stamp,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print("| router | own | union with own | wrong | wrong union | fallback |")
    print("|---|---|---|---|---|---|")
    for label, row in results.items():
        cells = " | ".join(str(row[k]) for k in ("own", "union", "wrong", "wrong-union", "fallback"))
        print(f"| {label} | {cells} |")
    print("\nleave one task out (share of the absent task's queries):")
    for absent, row in loto.items():
        print(
            f"  {absent:<11} wrong single {row['single']:5.1f}%  union {row['union']:5.1f}%  "
            f"fallback {row['fallback']:5.1f}%"
        )
    print(f"  mean wrong single: {loto_mean}% (one stage: {report['leave_one_task_out_one_stage_wrong_single_mean']}%)")
    print(f"\nunions served: {dict(unions.most_common())}")
    by_threads = ", ".join(f"{v} ms with {n} threads" for n, v in report["route_ms_p50_by_threads"].items())
    print(f"one routing decision p50 {p50} ms, p90 {p90} ms as served ({by_threads})")
    one = report["one_stage_route_ms"]
    print(f"  one stage (every query embedded): p50 {one['p50']} ms, p90 {one['p90']} ms")
    print(
        f"  decided by the n-gram stage: {results[SERVED]['first_stage']}% of the queries, which the one-stage "
        f"router decides alike {agreement['on_first_stage']}% of the time ({agreement['all']}% of all decisions)"
    )
    print(f"  of which the router without the embedder: p50 {report['decide_ms_p50']} ms")
    for target, ok in met.items():
        print(f"  {'met   ' if ok else 'MISSED'} {target}")
    print(f"wrote {args.out} and {args.confusion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
