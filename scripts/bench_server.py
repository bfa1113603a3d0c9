#!/usr/bin/env python3
"""Benchmark the server against direct generation, in one run.

1. Overhead: one request at a time through `taskmoe serve` (a separate process on loopback, routed,
   non-streamed, greedy) against `model.generate` of the same variant on the same prompt in this process,
   interleaved prompt by prompt. Target: median server latency <= 1.15x median direct latency.
2. Routing: embed + FAISS search + the routing rule, in this process. Target: p50 <= 15 ms.
3. Decoding in this process, without HTTP: one at a time against the batched decoder.
4. HTTP load, from `scripts/load_generator.py` (asyncio, its own process, its CPU time recorded), against
   a server with the expert pool and one with `--expert-pool false`: one pattern at 1 and 32 clients, three
   patterns mixed at 8 and 32, non-streamed and streamed, `max_tokens` 64 with `ignore_eos`. Targets: three
   patterns mixed at 32 clients reach >= 80% of one pattern's tokens/s at 32, and one pattern keeps its
   scaling over one client.
5. Cycling: a budget that holds the union of all demo patterns' experts, each pattern asked in turn for
   three rounds; evictions after the first round (target with the pool: none).
6. Chunked prefill: a 2,000-token prompt arriving among 16 streams, on a long-context copy of the demo
   model; the streams' inter-token gaps with whole-prompt prefill and with `--max-prefill-tokens`.

Writes `bench/results/server.json` (the README's tables are rendered from it by
`scripts/render_readme.py`) and prints Markdown tables.

    python scripts/bench_server.py [--prompts-per-task 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
LOAD_MAX_TOKENS = 64
ONE_PATTERN = ["demo-moe@sort"]
THREE_PATTERNS = ["demo-moe@sort", "demo-moe@upper", "demo-moe@arith"]
LONG_PROMPT_CHARACTERS = 2000  # the demo tokenizer has one token per character


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def launch(
    model: Path, port: int, budget: str, threads: int, workers: int | None, extra: Sequence[str] = ()
) -> subprocess.Popen:
    options = ["--cache-budget", budget, "--log-level", "warning", "--torch-threads", str(threads), *extra]
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


def http_load(
    url: str, models: list[str], prompts: list[str], clients: int, requests: int, stream: bool, **extra: Any
) -> dict[str, Any]:
    """`requests` requests from `clients` concurrent clients of `scripts/load_generator.py`, in its own
    process; returns the generator's raw report (per request results, wall and CPU time)."""
    spec = {
        "url": url,
        "models": models,
        "prompts": prompts,
        "clients": clients,
        "requests": requests,
        "stream": stream,
        "max_tokens": LOAD_MAX_TOKENS,
        **extra,
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_generator.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def summarise_load(report: dict[str, Any]) -> dict[str, Any]:
    results = report["results"]
    failed = sum(1 for r in results if r["status"] != 200)
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    summary = {
        "requests": len(results),
        "failed": failed,
        "tokens_per_second": tokens / report["wall_s"],
        "latency_p50_ms": statistics.median(latencies) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "generator_cpu_s": report["cpu_s"],
        "generator_cpu_share": report["cpu_share_of_a_core"],
    }
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    if ttft:
        summary["ttft_p50_ms"] = statistics.median(ttft) * 1000
        summary["ttft_p99_ms"] = percentile(ttft, 99) * 1000
    return summary


def load_levels(url: str, prompts: list[str], quick: bool) -> list[dict[str, Any]]:
    """One pattern at 1 and 32 clients, three patterns mixed at 8 and 32; non-streamed and streamed."""
    levels = []
    scenarios = [("one pattern", ONE_PATTERN, 1), ("one pattern", ONE_PATTERN, 32)]
    scenarios += [("three patterns", THREE_PATTERNS, 8), ("three patterns", THREE_PATTERNS, 32)]
    for stream in (False, True):
        for name, models, clients in scenarios:
            requests = max(8, (2 if quick else 4) * clients)
            print(f"  {name}, {clients} clients, {'streamed' if stream else 'whole'} ...", file=sys.stderr)
            report = http_load(url, models, prompts, clients, requests, stream)
            levels.append({"scenario": name, "clients": clients, "stream": stream, **summarise_load(report)})
    return levels


def union_budget(model_dir: Path) -> int:
    """Bytes of the union of every stored pattern's experts (per layer), plus one expert per layer of room:
    what a pool needs to hold every demo pattern at once."""
    builder = VariantBuilder(model_dir)
    store = PatternStore(model_dir / "patterns", create=False)
    total = 0
    for layer, sparse in builder.sparse_layers.items():
        union: set[int] = set()
        for name in store.names():
            union |= set(store.get(name).selection.kept(layer) or range(sparse.num_experts))
        total += (min(len(union) + 1, sparse.num_experts)) * builder.expert_bytes(layer)
    return total


def cycling(model_dir: Path, prompt: str, budget: int, expert_pool: bool, threads: int) -> dict[str, Any]:
    """Ask each stored pattern in turn for three rounds; count evictions after the first round."""
    names = PatternStore(model_dir / "patterns", create=False).names()
    port = free_port()
    options = ["--expert-pool", "true" if expert_pool else "false"]
    server = launch(model_dir, port, str(budget), threads, None, options)
    url = f"http://127.0.0.1:{port}"
    evictions_metric = "taskmoe_pool_experts_evicted_total" if expert_pool else "taskmoe_cache_evictions_total"
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        after_first = 0.0
        for round_number in range(3):
            for name in names:
                client.chat.completions.create(
                    model=f"demo-moe@{name}", messages=[{"role": "user", "content": prompt}], max_tokens=4
                )
            if round_number == 0:
                after_first = metric(url, evictions_metric)
        evicted = metric(url, evictions_metric) - after_first
        misses = metric(url, "taskmoe_cache_misses_total")
    finally:
        server.terminate()
        server.wait(30)
    return {
        "expert_pool": expert_pool,
        "budget_bytes": budget,
        "patterns": len(names),
        "rounds": 3,
        "evictions_after_first_round": evicted,
        "misses": misses,
        "unit": "experts" if expert_pool else "variants",
    }


def long_context_copy(model_dir: Path, context: int) -> Path:
    """The demo model with a longer context window (its config only; the weights are linked), for timing a
    long prompt. Its answers past the trained length mean nothing; its costs are what is measured."""
    target = ROOT / "bench" / "checkpoints" / f"{model_dir.name}-context-{context}"
    target.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name in ("config.json", "patterns"):
            continue
        link = target / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = context
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def prefill_stall(
    model_dir: Path, threads: int, chunk: int | None, quick: bool, with_long_prompt: bool = True
) -> dict[str, Any]:
    """16 streams decoding while one 2,000-token prompt arrives: the streams' inter-token gaps (without the
    long prompt: the baseline)."""
    port = free_port()
    options = ["--max-prefill-tokens", str(chunk or 0), "--served-model-name", "demo-moe"]
    server = launch(model_dir, port, "4GiB", threads, None, options)
    url = f"http://127.0.0.1:{port}"
    long_prompt = ("the quick brown fox jumps over the lazy dog " * 60)[:LONG_PROMPT_CHARACTERS]
    try:
        streams_spec = dict(
            url=url, models=["demo-moe"], prompts=["Sort: 4, 2, 9, 1"], clients=16, requests=16, stream=True
        )
        streams_spec["max_tokens"] = 120 if quick else 200
        long_spec = dict(
            url=url,
            models=["demo-moe"],
            prompts=[long_prompt],
            clients=1,
            requests=1,
            stream=True,
            max_tokens=4,
            start_delay=0.5,
        )
        with ThreadPoolExecutor(2) as pool:
            streams_future = pool.submit(_generator, streams_spec)
            long_future = pool.submit(_generator, long_spec) if with_long_prompt else None
            streams = streams_future.result()
            long = long_future.result() if long_future else {"results": [{"status": 200, "ttft": None}]}
    finally:
        server.terminate()
        server.wait(30)
    failed = [r["status"] for r in [*streams["results"], *long["results"]] if r["status"] != 200]
    if failed:
        raise RuntimeError(f"prefill benchmark: requests failed with {failed}")
    gaps = [gap for r in streams["results"] for gap in r.get("gaps", [])]
    return {
        "long_prompt": with_long_prompt,
        "max_prefill_tokens": chunk,
        "streams": 16,
        "long_prompt_characters": len(long_prompt) if with_long_prompt else 0,
        "gap_p50_ms": statistics.median(gaps) * 1000,
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        "gap_max_ms": max(gaps) * 1000,
        "long_prompt_ttft_ms": (long["results"][0].get("ttft") or 0.0) * 1000,
    }


def _generator(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_generator.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("--prompts-per-task", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt in the overhead phase")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="in-process decoding levels")
    parser.add_argument("--budget", default="4GiB", help="the server's --cache-budget")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads, server and direct alike")
    parser.add_argument("--workers", type=int, default=None, help="the server's --workers (default: its own)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts and requests: a smoke run")
    parser.add_argument("--only-prefill", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server.json")
    args = parser.parse_args()
    if args.quick:
        args.prompts_per_task, args.repeats = 2, 1

    prompts = [e.prompt for task in TASKS for e in get_task(task).examples(args.prompts_per_task, EVAL_SEED + 1)]
    mixed = [prompts[t * args.prompts_per_task + i] for i in range(args.prompts_per_task) for t in range(len(TASKS))]
    torch.set_num_threads(args.torch_threads)
    load: dict[str, list[dict[str, Any]]] = {}
    for pool in (True, False):
        port = free_port()
        server = launch(
            args.model, port, args.budget, args.torch_threads, args.workers, ["--expert-pool", str(pool).lower()]
        )
        url = f"http://127.0.0.1:{port}"
        try:
            if pool:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
                print("overhead: one request at a time, server vs direct generate ...", file=sys.stderr)
                single = overhead(client, args.model, mixed, args.repeats)
                print("routing cost ...", file=sys.stderr)
                routing = routing_cost(args.model, mixed)
                print("decoder scaling, in process ...", file=sys.stderr)
                decoding = decoder_scaling(args.model, mixed, args.clients)
            print(f"HTTP load, expert pool {pool} ...", file=sys.stderr)
            http_load(url, THREE_PATTERNS, mixed, 4, 8, False)  # warm-up: every pattern leased once
            load["pool" if pool else "variants"] = load_levels(url, mixed, args.quick)
        finally:
            server.terminate()
            server.wait(30)
    print("cycling through every pattern under a union budget ...", file=sys.stderr)
    budget = union_budget(args.model)
    cycles = [cycling(args.model, mixed[0], budget, pool, args.torch_threads) for pool in (True, False)]
    print("a long prompt among 16 streams ...", file=sys.stderr)
    long_model = long_context_copy(args.model, 4096)
    prefill = [prefill_stall(long_model, args.torch_threads, None, args.quick, with_long_prompt=False)]
    prefill += [prefill_stall(long_model, args.torch_threads, chunk, args.quick) for chunk in (None, 512, 128)]

    def level(mode: str, scenario: str, clients: int, stream: bool) -> dict[str, Any]:
        return next(
            x for x in load[mode] if x["scenario"] == scenario and x["clients"] == clients and x["stream"] == stream
        )

    ratios = {}
    for mode in load:
        for stream in (False, True):
            key = f"{mode}_{'streamed' if stream else 'whole'}"
            one_32 = level(mode, "one pattern", 32, stream)["tokens_per_second"]
            ratios[key] = {
                "one_pattern_32_over_1": one_32 / level(mode, "one pattern", 1, stream)["tokens_per_second"],
                "three_patterns_32_over_one_pattern_32": level(mode, "three patterns", 32, stream)["tokens_per_second"]
                / one_32,
            }
    pool_cycle = next(c for c in cycles if c["expert_pool"])
    result = {
        "settings": {
            "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
            "max_tokens": MAX_TOKENS,
            "load_max_tokens": LOAD_MAX_TOKENS,
            "prompts": len(mixed),
            "repeats": args.repeats,
            "budget": args.budget,
            "torch_threads": torch.get_num_threads(),
            "workers": args.workers or "server default",
            "cpus": os.cpu_count(),
            "quick": args.quick,
        },
        "single_request": single,
        "routing": routing,
        "decoder": decoding,
        "load": load,
        "ratios": ratios,
        "cycling": cycles,
        "prefill": prefill,
        "targets": {
            "server_vs_direct_generate": {"target": 1.15, "measured": single["ratio"], "pass": single["ratio"] <= 1.15},
            "routing_p50_ms": {"target": 15.0, "measured": routing["p50_ms"], "pass": routing["p50_ms"] <= 15.0},
            "three_patterns_vs_one_at_32_clients": {
                "target": 0.8,
                "measured": ratios["pool_whole"]["three_patterns_32_over_one_pattern_32"],
                "pass": ratios["pool_whole"]["three_patterns_32_over_one_pattern_32"] >= 0.8,
            },
            "evictions_after_first_round_with_the_pool": {
                "target": 0,
                "measured": pool_cycle["evictions_after_first_round"],
                "pass": pool_cycle["evictions_after_first_round"] == 0,
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(render_tables(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def render_tables(result: dict[str, Any]) -> str:
    """The Markdown tables of a result (the README's are rendered by scripts/render_readme.py)."""
    single, routing = result["single_request"], result["routing"]
    lines = [
        "| measure | measured | target |",
        "|---|---|---|",
        f"| one request, pattern named, vs direct `generate` | {single['ratio']:.2f}x | <= 1.15x |",
        f"| routing p50 | {routing['p50_ms']:.1f} ms | <= 15 ms |",
        "",
        "| server | scenario | clients | streamed | tokens/s | latency p50 | latency p99 | generator CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, levels in result["load"].items():
        for x in levels:
            lines.append(
                f"| {mode} | {x['scenario']} | {x['clients']} | {'yes' if x['stream'] else 'no'} | "
                f"{x['tokens_per_second']:.0f} | {x['latency_p50_ms']:.0f} ms | {x['latency_p99_ms']:.0f} ms | "
                f"{100 * x['generator_cpu_share']:.0f}% |"
            )
    lines += ["", "| ratio | value |", "|---|---|"]
    for key, values in result["ratios"].items():
        for name, value in values.items():
            lines.append(f"| {key}: {name} | {value:.2f} |")
    lines += ["", "| cycling, union budget | evictions after round 1 |", "|---|---|"]
    for c in result["cycling"]:
        lines.append(
            f"| {'expert pool' if c['expert_pool'] else 'variants'} | {c['evictions_after_first_round']:.0f} |"
        )
    lines += [
        "",
        "| prefill | gap p50 | gap p99 | gap max | long prompt TTFT |",
        "|---|---|---|---|---|",
    ]
    for p in result["prefill"]:
        label = f"{p['max_prefill_tokens'] or 'whole prompt'}" if p["long_prompt"] else "no long prompt"
        lines.append(
            f"| {label} | {p['gap_p50_ms']:.0f} ms | {p['gap_p99_ms']:.0f} ms | "
            f"{p['gap_max_ms']:.0f} ms | {p['long_prompt_ttft_ms']:.0f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
