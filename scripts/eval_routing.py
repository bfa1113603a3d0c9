"""Routing accuracy on real benchmark prompts: how often a query reaches the pattern of its own task.

    python scripts/eval_routing.py [--data data/tasks] [--examples 64]

For each task file, the first `--examples` prompts are the pattern's routing examples (stored in a real
pattern store, searched with FAISS); the remaining prompts are the queries. Every candidate rule is
measured on the same queries: k-nearest-neighbour voting at several k, nearest centroid, and a light
classifier (multinomial logistic regression on the embeddings, the server's default rule), all through
`server.routing.Router`; also PreMoe's router-signature key. Writes bench/results/routing.json and
prints a table; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pattern_store.embedder import Embedder
from pattern_store.pattern import TaskPattern
from pattern_store.selection import Selection
from pattern_store.store import PatternStore
from server.routing import Router

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "tasks"  # vendored from the shared notes


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


class RouterSignature:
    """PreMoe's own retrieval key: the mean routing distribution of the query at the first MoE layer."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.max_length = int(self.model.config.max_position_embeddings)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.max_length]
            out = self.model(torch.tensor([ids]), output_router_logits=True)
            rows.append(torch.softmax(out.router_logits[0].float(), dim=-1).mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=64, help="routing examples per task (the first N prompts)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing.json"))
    parser.add_argument(
        "--signature-model", type=Path, default=Path("models/demo-moe"), help="MoE whose first router gives the key"
    )
    args = parser.parse_args(argv)

    tasks = load_tasks(args.data)
    names = sorted(tasks)
    embedder = Embedder()
    started = time.perf_counter()
    example_texts = {t: tasks[t][: args.examples] for t in names}
    query_texts = {t: tasks[t][args.examples :] for t in names}
    example_vectors = {t: embedder.embed(example_texts[t]) for t in names}
    query_vectors = {t: embedder.embed(query_texts[t]) for t in names}
    embed_seconds = time.perf_counter() - started

    queries = [(t, v) for t in names for v in query_vectors[t]]
    results: dict[str, dict[str, float]] = {}

    def record(rule: str, predicted: list[str]) -> None:
        per_task = {t: 0 for t in names}
        for (truth, _), guess in zip(queries, predicted, strict=True):
            per_task[truth] += guess == truth
        results[rule] = {t: per_task[t] / len(query_texts[t]) for t in names}
        results[rule]["overall"] = sum(per_task.values()) / len(queries)

    with tempfile.TemporaryDirectory() as tmp:
        store = routing_store(Path(tmp), example_vectors, example_texts)
        for rule, k in (("knn", 1), ("knn", 5), ("knn", 10), ("knn", 20), ("centroid", 10), ("classifier", 10)):
            router = Router(store, embedder, rule=rule, k=k, threshold=-1.0)
            label = f"knn-vote k={k}" if rule == "knn" else rule
            record(label, [router.route_vector(v).pattern or "" for _, v in queries])
        router = Router(store, embedder, threshold=-1.0)  # the default rule
        timings = []
        for text in [q for t in names for q in query_texts[t][:20]]:
            begin = time.perf_counter()
            router.route(text)
            timings.append(time.perf_counter() - begin)

    centroids = torch.nn.functional.normalize(torch.stack([example_vectors[t].mean(0) for t in names]), dim=1)

    if args.signature_model.is_dir():
        signature = RouterSignature(args.signature_model)
        example_signatures = {t: signature.embed(example_texts[t]) for t in names}
        signature_centroids = torch.nn.functional.normalize(
            torch.stack([example_signatures[t].mean(0) for t in names]), dim=1
        )
        query_signatures = torch.cat([signature.embed(query_texts[t]) for t in names])
        record(
            "router-signature centroid", [names[int(i)] for i in (query_signatures @ signature_centroids.T).argmax(1)]
        )

    margins = {}
    similarity = torch.stack([v for _, v in queries]) @ centroids.T
    top2 = similarity.topk(2, dim=1).values
    truth = torch.tensor([names.index(t) for t, _ in queries])
    right = similarity.argmax(1) == truth
    for margin in (0.0, 0.02, 0.05, 0.1):
        answered = (top2[:, 0] - top2[:, 1]) >= margin
        margins[str(margin)] = {
            "coverage": float(answered.float().mean()),
            "accuracy_answered": float(right[answered].float().mean()) if answered.any() else 0.0,
        }

    best = max(results, key=lambda rule: results[rule]["overall"])
    report = {
        "settings": {"examples_per_task": args.examples, "queries": len(queries), "tasks": names},
        "embedder": embedder.model_id,
        "embed_seconds": round(embed_seconds, 1),
        "route_ms_p50": round(1000 * statistics.median(timings), 2),
        "results": results,
        "best": best,
        "centroid_margin_rule": margins,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| rule | " + " | ".join(names) + " | overall |")
    print("|---|" + "---|" * (len(names) + 1))
    for rule, values in results.items():
        cells = " | ".join(f"{100 * values[t]:.1f}" for t in names)
        print(f"| {rule} | {cells} | **{100 * values['overall']:.1f}** |")
    print(f"\nbest: {best}; one routing decision (embed + search) p50 {report['route_ms_p50']} ms")
    print("nearest-centroid with a margin rule (top-1 minus top-2 similarity >= m, else fall back):")
    for margin, values in margins.items():
        print(
            f"  m={margin}: answers {100 * values['coverage']:.1f}%, right on {100 * values['accuracy_answered']:.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
