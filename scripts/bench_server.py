#!/usr/bin/env python3
"""Benchmark the server against direct generation, in one run.

1. Overhead: one request at a time through `taskmoe serve` (a separate process on loopback, routed,
   non-streamed, greedy) against `model.generate` of the same variant on the same prompt in this process,
   interleaved prompt by prompt. Target: median server latency <= 1.15x median direct latency.
2. Routing: embed + FAISS search + the routing rule, in this process. Target: p50 <= 15 ms.
3. Load: N concurrent streaming clients over mixed demo tasks: throughput (completion tokens/s),
   latency p50/p99, time to first token p50/p99, variant cache hit rate (from /metrics).

Writes `bench/results/server.json` and prints a Markdown table.

    python scripts/bench_server.py [--prompts-per-task 8] [--clients 1 4 8] [--requests 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import openai
import torch

from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore
from server.batching import BatchedDecoder
from server.demo.evaluate import EVAL_SEED, chat_prompt_ids
from server.demo.tasks import get_task
from server.engine import Generation, SamplingParams
from server.model.variant import VariantBuilder
from server.patterns import load_tokenizer
from server.routing import Router

from local_server import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arith", "reverse", "sort", "upper", "spell", "translate")
MAX_TOKENS = 32


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def launch(model: Path, port: int, budget: str, threads: int, workers: int | None) -> subprocess.Popen:
    options = ["--cache-budget", budget, "--log-level", "warning", "--torch-threads", str(threads)]
    return start_server(model, port, options + (["--workers", str(workers)] if workers is not None else []))


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def overhead(client: openai.OpenAI, model_dir: Path, prompts: list[str], repeats: int) -> dict:
    """Server latency vs direct `generate` of the variant the server chose, prompt by prompt."""
    builder = VariantBuilder(model_dir)
    tokenizer = load_tokenizer(model_dir)
    store = PatternStore(model_dir / "patterns", create=False)
    variants: dict[str, torch.nn.Module] = {}
    routed_times, explicit_times, direct_times, engine_times, mismatches = [], [], [], [], 0
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        raw = client.chat.completions.with_raw_response.create(
            model="demo-moe", messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )  # warm: the variant is built and cached before timing
        pattern = raw.headers["x-taskmoe-pattern"]
        if pattern not in variants:
            variants[pattern] = builder.build(None if pattern == "full" else store.get(pattern).selection)
        model = variants[pattern]
        ids = chat_prompt_ids(tokenizer, prompt)
        input_ids = torch.tensor([ids])
        explicit = "demo-moe" if pattern == "full" else f"demo-moe@{pattern}"
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.chat.completions.create(
                model="demo-moe", messages=messages, temperature=0, max_tokens=MAX_TOKENS
            )
            routed_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.chat.completions.create(model=explicit, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
            explicit_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids,
                    max_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            direct_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
            Generation(model, tokenizer, ids, params, [tokenizer.eos_token_id]).run()
            engine_times.append(time.perf_counter() - started)
            generated = out[0, len(ids) :].tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            mismatches += response.choices[0].message.content != tokenizer.decode(generated, skip_special_tokens=True)
    explicit_p50, routed_p50 = statistics.median(explicit_times), statistics.median(routed_times)
    direct_p50 = statistics.median(direct_times)
    return {
        "requests": len(routed_times),
        "server_explicit_p50_ms": explicit_p50 * 1000,
        "server_routed_p50_ms": routed_p50 * 1000,
        "direct_generate_p50_ms": direct_p50 * 1000,
        "direct_engine_p50_ms": statistics.median(engine_times) * 1000,
        "ratio": explicit_p50 / direct_p50,
        "ratio_routed": routed_p50 / direct_p50,
        "answers_differing_from_direct": mismatches,
    }


def routing_cost(model_dir: Path, prompts: list[str]) -> dict:
    router = Router(PatternStore(model_dir / "patterns", create=False), Embedder())
    router.route(prompts[0])  # learn the classifier once
    times = []
    for prompt in prompts * 3:
        started = time.perf_counter()
        router.route(prompt)
        times.append(time.perf_counter() - started)
    return {"queries": len(times), "p50_ms": statistics.median(times) * 1000, "p99_ms": percentile(times, 99) * 1000}


def decoder_scaling(model_dir: Path, prompts: list[str], clients: list[int]) -> list[dict]:
    """In this process, without HTTP: the same greedy generations one after another, then from N threads
    through one `BatchedDecoder` (what the server does per variant)."""
    model = VariantBuilder(model_dir).build(None)
    tokenizer = load_tokenizer(model_dir)

    def generations() -> list[Generation]:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        return [
            Generation(model, tokenizer, chat_prompt_ids(tokenizer, p), params, [tokenizer.eos_token_id])
            for p in prompts
        ]

    work = generations()
    started = time.perf_counter()
    for generation in work:
        generation.run()
    rows = [
        {
            "clients": 1,
            "mode": "one at a time",
            "tokens_per_second": sum(g.completion_tokens for g in work) / (time.perf_counter() - started),
        }
    ]
    for count in clients:
        decoder, work = BatchedDecoder(model), generations()
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(decoder.run, work))
        wall = time.perf_counter() - started
        rows.append(
            {"clients": count, "mode": "batched", "tokens_per_second": sum(g.completion_tokens for g in work) / wall}
        )
    return rows


def load(url: str, jobs: list[tuple[str, str]], clients: int, requests: int) -> dict:
    """`requests` streamed requests of (model, prompt) `jobs` from `clients` concurrent clients."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    hits, misses = metric(url, "taskmoe_cache_hits_total"), metric(url, "taskmoe_cache_misses_total")

    def one(index: int) -> tuple[float, float, int]:
        model, prompt = jobs[index % len(jobs)]
        started = time.perf_counter()
        first, tokens = None, 0
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - started, first or 0.0, tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    hits, misses = metric(url, "taskmoe_cache_hits_total") - hits, metric(url, "taskmoe_cache_misses_total") - misses
    return {
        "clients": clients,
        "requests": requests,
        "tokens_per_second": tokens / wall,
        "latency_p50_ms": statistics.median(latencies) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "ttft_p50_ms": statistics.median(ttft) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "cache_hit_rate": hits / max(1.0, hits + misses),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("--prompts-per-task", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt in the overhead phase")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=48, help="requests per load level")
    parser.add_argument("--budget", default="4GiB", help="the server's --cache-budget")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads, server and direct alike")
    parser.add_argument("--workers", type=int, default=None, help="the server's --workers (default: its own)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server.json")
    args = parser.parse_args()

    prompts = [e.prompt for task in TASKS for e in get_task(task).examples(args.prompts_per_task, EVAL_SEED + 1)]
    mixed = [prompts[t * args.prompts_per_task + i] for i in range(args.prompts_per_task) for t in range(len(TASKS))]
    torch.set_num_threads(args.torch_threads)
    port = free_port()
    server = launch(args.model, port, args.budget, args.torch_threads, args.workers)
    url = f"http://127.0.0.1:{port}"
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        print("overhead: one request at a time, server vs direct generate ...", file=sys.stderr)
        single = overhead(client, args.model, mixed, args.repeats)
        print("routing cost ...", file=sys.stderr)
        routing = routing_cost(args.model, mixed)
        print("decoder scaling, in process ...", file=sys.stderr)
        decoding = decoder_scaling(args.model, mixed, args.clients)
        levels = []
        routed = [("demo-moe", prompt) for prompt in mixed]
        explicit = [(f"demo-moe@{TASKS[i % len(TASKS)]}", prompt) for i, prompt in enumerate(mixed)]
        for mode, jobs in (("routed", routed), ("explicit", explicit)):
            for clients in args.clients:
                print(f"load: {clients} concurrent clients, {mode} ...", file=sys.stderr)
                levels.append({"mode": mode, **load(url, jobs, clients, args.requests)})
    finally:
        server.terminate()
        server.wait(30)

    result = {
        "settings": {
            "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
            "max_tokens": MAX_TOKENS,
            "prompts": len(mixed),
            "repeats": args.repeats,
            "budget": args.budget,
            "torch_threads": torch.get_num_threads(),
            "workers": args.workers or "server default",
            "cpus": os.cpu_count(),
        },
        "single_request": single,
        "routing": routing,
        "load": levels,
        "decoder": decoding,
        "targets": {
            "server_vs_direct_generate": {"target": 1.15, "measured": single["ratio"], "pass": single["ratio"] <= 1.15},
            "routing_p50_ms": {"target": 15.0, "measured": routing["p50_ms"], "pass": routing["p50_ms"] <= 15.0},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    print("\n| measure | measured | target |\n|---|---|---|")
    print(
        f"| one request through the server (explicit pattern) vs direct `generate`, median of {single['requests']} | "
        f"{single['ratio']:.2f}x ({single['server_explicit_p50_ms']:.1f} ms vs "
        f"{single['direct_generate_p50_ms']:.1f} ms) | <= 1.15x |"
    )
    print(
        f"| the same, routed (embedding the query included) | {single['ratio_routed']:.2f}x "
        f"({single['server_routed_p50_ms']:.1f} ms) | (routing has its own target) |"
    )
    print(f"| routing (embed + search + rule), p50 | {routing['p50_ms']:.1f} ms | <= 15 ms |")
    print("\n| pattern | clients | tokens/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 | cache hit rate |")
    print("|---|---|---|---|---|---|---|---|")
    for level in levels:
        print(
            f"| {level['mode']} | {level['clients']} | {level['tokens_per_second']:.0f} | "
            f"{level['latency_p50_ms']:.0f} ms | "
            f"{level['latency_p99_ms']:.0f} ms | {level['ttft_p50_ms']:.0f} ms | {level['ttft_p99_ms']:.0f} ms | "
            f"{level['cache_hit_rate']:.1%} |"
        )
    print("\n| decoding in process, no HTTP | clients | tokens/s |\n|---|---|---|")
    for row in decoding:
        print(f"| {row['mode']} | {row['clients']} | {row['tokens_per_second']:.0f} |")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
