"""Accuracy as a user meets it: unseen demo prompts sent to `taskmoe serve`, routed, against the full model.

    python scripts/eval_served.py                          # models/demo-moe, its shipped store, shipped defaults
    python scripts/eval_served.py --model models/demo-moe-fine --served-model-name demo-moe -n 100

The server runs in its own process exactly as `taskmoe serve --model MODEL` starts it (default store,
routing rule, threshold, fallback, cache budget). Every prompt is sent twice with the official `openai`
client, greedy: routed (`"model": "demo-moe"`) and to the unpruned model (`"demo-moe@full"`), and both
answers are scored by exact match. The prompts come from a seed that neither training, calibration nor the
held-out evaluation uses, and any prompt that is one of a stored pattern's calibration prompts is skipped.
Writes `bench/results/served.json`: per task, how often each way answered right, which pattern served
the routed prompts, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai

from demo.tasks import TASK_NAMES, get_task
from pattern_store.store import PatternStore

from _measured import measured
from local_server import free_port, start_server

SERVED_SEED = 5_150_001  # used nowhere else: not training's stream, not calibration's 7000, not EVAL_SEED
MAX_TOKENS = 32


def unseen_examples(store_dir: Path, n: int, seed: int) -> list[Any]:
    """`n` examples per task from `seed`, leaving out every stored pattern's calibration prompt."""
    store = PatternStore(store_dir, create=False)
    seen = {example for name in store.names() for example in store.get(name).examples}
    examples = []
    for task in TASK_NAMES:
        generated, attempt = [], 0
        while len(generated) < n:
            for example in get_task(task).examples(n * (attempt + 2), seed + attempt):
                if example.prompt not in seen and example not in generated and len(generated) < n:
                    generated.append(example)
            attempt += 1
        examples += generated
    return examples


def ask(client: openai.OpenAI, model: str, prompt: str) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS
    )
    return raw.parse().choices[0].message.content or "", raw.headers.get("x-taskmoe-pattern", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/demo-moe"))
    parser.add_argument("--served-model-name", help="the name the server answers to (default: the directory's)")
    parser.add_argument(
        "-n", type=int, default=300, help="prompts per task (default 300; at 100, one prompt moves the ratio 0.17%%)"
    )
    parser.add_argument("--seed", type=int, default=SERVED_SEED)
    parser.add_argument("--clients", type=int, default=4, help="concurrent requests (default 4)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/served.json"))
    args = parser.parse_args(argv)
    name = args.served_model_name or args.model.name
    examples = unseen_examples(args.model / "patterns", args.n, args.seed)
    port = free_port()
    options = ["--log-level", "warning"]
    options += ["--served-model-name", args.served_model_name] if args.served_model_name else []
    process = start_server(args.model, port, options)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        with ThreadPoolExecutor(args.clients) as pool:
            routed = list(pool.map(lambda e: ask(client, name, e.prompt), examples))
            full = list(pool.map(lambda e: ask(client, f"{name}@full", e.prompt), examples))
    finally:
        process.terminate()
        process.wait(30)
    per_task: dict[str, dict[str, Any]] = {}
    for example, (answer, pattern), (full_answer, _) in zip(examples, routed, full, strict=True):
        row = per_task.setdefault(example.task, {"n": 0, "routed": 0, "full": 0, "patterns": Counter()})
        task = get_task(example.task)
        row["n"] += 1
        row["routed"] += task.score(example, answer)
        row["full"] += task.score(example, full_answer)
        row["patterns"][pattern] += 1
    total = {key: sum(row[key] for row in per_task.values()) for key in ("n", "routed", "full")}
    report = {
        "model": str(args.model),
        "served_model_name": name,
        "seed": args.seed,
        "prompts_per_task": args.n,
        "command": f"taskmoe serve --model {args.model}"
        + (f" --served-model-name {name}" * bool(args.served_model_name)),
        "tasks": {
            task: {
                "n": row["n"],
                "routed_correct": row["routed"] / row["n"],
                "full_correct": row["full"] / row["n"],
                "own_pattern": row["patterns"].get(task, 0) / row["n"],
                "patterns": dict(row["patterns"]),
            }
            for task, row in per_task.items()
        },
        "routed_correct": total["routed"] / total["n"],
        "full_correct": total["full"] / total["n"],
        "ratio": total["routed"] / max(total["full"], 1),
        "measured": measured(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'task':<11}{'routed':>8}{'full':>8}{'own pattern':>13}")
    for task, row in report["tasks"].items():
        print(
            f"{task:<11}{100 * row['routed_correct']:>7.1f}%{100 * row['full_correct']:>7.1f}%"
            f"{100 * row['own_pattern']:>12.1f}%"
        )
    print(
        f"{'all':<11}{100 * report['routed_correct']:>7.1f}%{100 * report['full_correct']:>7.1f}%   "
        f"routed / full = {100 * report['ratio']:.1f}%   ({args.out})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
