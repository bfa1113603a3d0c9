#!/usr/bin/env python3
"""Benchmark the server: its overhead over direct generation, and what it serves under HTTP load.

Phases (`--phases` picks some; all by default):

- overhead: one request at a time through `taskmoe serve` (a separate process on loopback, non-streamed,
  greedy, pattern named and routed) against `model.generate` of the same variant on the same prompt in this
  process, interleaved prompt by prompt. Target: median server latency <= 1.15x median direct latency.
- routing: a completion's routing decision (two stages: n-grams, then the embedder when they are not
  confident), in this process. Target: p50 <= 5 ms.
- decoder: decoding in this process, without HTTP: one at a time against the batched decoder.
- load: HTTP load from `scripts/load_generator.py`, a process of its own (asyncio, one connection per
  client) whose CPU time is recorded, so that the tables show the generator was not the limit. Against a
  server with the expert pool and one with `--expert-pool false` (a model and a decoding thread per
  pattern), same budget: one pattern (demo-moe@sort) at 1 and 32 clients, three patterns mixed
  (@sort, @upper, @arith, round robin) at 8 and 32, non-streamed and streamed, `max_tokens` 64 with
  `ignore_eos`, greedy. Targets: one pattern at 32 clients >= 11x the tokens/s of one client; three
  patterns mixed at 32 clients >= 90% of one pattern's tokens/s at 32, eight patterns (the six demo
  patterns and two random selections) >= 85%, and one pattern through the pool >= 97% of the server with a
  variant per pattern (with the pool).
- cycling: a budget that holds the union of all stored patterns' experts (plus one expert per layer),
  each pattern asked in turn for three rounds; evictions after the first round, with the pool and with a
  variant per pattern. Target with the pool: none.
- prefill: a 2,000-token prompt arriving among 16 streams, on a long-context copy of the demo model; the
  streams' inter-token gaps with whole-prompt prefill and with `--max-prefill-tokens`.

Writes `bench/results/server.json` (the docs' tables are rendered from it by `scripts/render_docs.py`)
and prints the same tables.

    python scripts/bench_server.py                       # the full run, on a quiet machine
    python scripts/bench_server.py --quick               # a smoke run: fewer prompts, requests and levels
    python scripts/bench_server.py --phases load cycling --out /tmp/server.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import openai
import torch

from demo.evaluate import EVAL_SEED, chat_prompt_ids
from demo.tasks import get_task
from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore
from server.batching import BatchedDecoder
from server.engine import Generation, SamplingParams
from server.model.variant import VariantBuilder
from server.patterns import load_tokenizer
from server.routing import Router

from _measured import measured
from local_server import free_port, scrape, start_server
from tables_server import server_tables

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arith", "reverse", "sort", "upper", "spell", "translate")
PHASES = ("overhead", "routing", "decoder", "load", "cycling", "prefill")
MAX_TOKENS = 32
LOAD_MAX_TOKENS = 64
ONE_PATTERN = ["demo-moe@sort"]
THREE_PATTERNS = ["demo-moe@sort", "demo-moe@upper", "demo-moe@arith"]
# the six demo patterns and two more with other kept experts (random selections, `extra_patterns`)
EXTRA_PATTERNS = {"sort-random": ("sort", 1), "upper-random": ("upper", 2)}
EIGHT_PATTERNS = [f"demo-moe@{task}" for task in TASKS] + [f"demo-moe@{name}" for name in EXTRA_PATTERNS]
# (scenario, models, clients): the levels the ratios below compare
SCENARIOS = [
    ("one pattern", ONE_PATTERN, 1),
    ("one pattern", ONE_PATTERN, 32),
    ("three patterns", THREE_PATTERNS, 8),
    ("three patterns", THREE_PATTERNS, 32),
    ("eight patterns", EIGHT_PATTERNS, 32),
]
ROUTING_TARGET_MS = 5.0  # a routing decision's p50 (one thread in the server)
SCALING_TARGET = 11.0  # one pattern, tokens/s at 32 clients over 1 client
MIXED_TARGET = 0.9  # three patterns mixed over one pattern, tokens/s at 32 clients
EIGHT_TARGET = 0.85  # eight patterns mixed over one pattern, tokens/s at 32 clients
POOL_VS_VARIANT_TARGET = 0.97  # one pattern at 32 clients, the pool over a variant per pattern
GENERATOR_CPU_LIMIT = 0.5  # of a core: above it, the generator may be what limits a level
CYCLING_ROUNDS = 3
LONG_PROMPT_CHARACTERS = 2000  # the demo tokenizer has one token per character
GENERATOR = ROOT / "scripts" / "load_generator.py"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@contextmanager
def serving(
    model: Path, budget: str | int, threads: int, workers: int | None = None, extra: Sequence[str] = ()
) -> Iterator[str]:
    """`taskmoe serve` in its own process for the length of the block; yields its base URL."""
    port = free_port()
    options = ["--cache-budget", str(budget), "--log-level", "warning", "--torch-threads", str(threads), *extra]
    options += ["--workers", str(workers)] if workers is not None else []
    server = start_server(model, port, options)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def pool_option(pool: bool) -> list[str]:
    return ["--expert-pool", "true" if pool else "false"]


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
        router.route(prompt, similarity=False)  # as a completion routes: no similarity search
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


def run_generator(spec: dict[str, Any]) -> dict[str, Any]:
    """`scripts/load_generator.py` with `spec`, in a process of its own: its CPU is not the server's
    interpreter's, and its own CPU time comes back with its results."""
    done = subprocess.run(
        [sys.executable, str(GENERATOR), json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def load_spec(
    url: str, models: list[str], prompts: list[str], clients: int, requests: int, stream: bool
) -> dict[str, Any]:
    return {
        "url": url,
        "models": models,
        "prompts": prompts,
        "clients": clients,
        "requests": requests,
        "stream": stream,
        "max_tokens": LOAD_MAX_TOKENS,
        "ignore_eos": True,
    }


def summarise_load(report: dict[str, Any]) -> dict[str, Any]:
    """Throughput and latency of one level, and what the generator cost; a failed request fails the level
    (tokens/s with errors in it would compare unlike with like)."""
    results = report["results"]
    failed = [r for r in results if r["status"] != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0]}")
    latencies = [r["latency"] for r in results]
    summary = {
        "requests": len(results),
        "failed": 0,
        "completion_tokens": sum(r["tokens"] for r in results),
        "wall_s": report["wall_s"],
        "tokens_per_second": sum(r["tokens"] for r in results) / report["wall_s"],
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


def load_levels(url: str, prompts: list[str], per_client: int, least: int) -> list[dict[str, Any]]:
    """Every scenario of SCENARIOS, non-streamed then streamed; `per_client` requests per client (at least
    `least`) so that a level lasts long enough to be more than its start and its tail."""
    levels = []
    for stream in (False, True):
        for name, models, clients in SCENARIOS:
            requests = max(least, per_client * clients)
            print(f"  {name}, {clients} clients, {'streamed' if stream else 'whole'} ...", file=sys.stderr)
            report = run_generator(load_spec(url, models, prompts, clients, requests, stream))
            level = {"scenario": name, "clients": clients, "stream": stream, **summarise_load(report)}
            if (share := level["generator_cpu_share"]) > GENERATOR_CPU_LIMIT:
                print(f"  warning: the load generator used {share:.0%} of a core: it may be the limit", file=sys.stderr)
            levels.append(level)
    return levels


def warm_up(url: str, prompts: list[str], requests: int) -> None:
    """Every pattern of the load leased, and every code path run, before anything is timed."""
    for stream in (False, True):
        summarise_load(run_generator(load_spec(url, EIGHT_PATTERNS, prompts, 8, max(requests, 16), stream)))


def load_ratios(load: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per server and stream mode: one pattern 32 / 1 client, and three patterns / one pattern at 32."""

    def tokens(mode: str, scenario: str, clients: int, stream: bool) -> float:
        return next(
            x["tokens_per_second"]
            for x in load[mode]
            if x["scenario"] == scenario and x["clients"] == clients and x["stream"] == stream
        )

    ratios = {}
    for mode in load:
        for stream in (False, True):
            one_32 = tokens(mode, "one pattern", 32, stream)
            ratios[f"{mode}_{'streamed' if stream else 'whole'}"] = {
                "one_pattern_32_over_1": one_32 / tokens(mode, "one pattern", 1, stream),
                "three_patterns_32_over_one_pattern_32": tokens(mode, "three patterns", 32, stream) / one_32,
                "eight_patterns_32_over_one_pattern_32": tokens(mode, "eight patterns", 32, stream) / one_32,
            }
            if mode == "pool" and "variants" in load:
                variant_32 = tokens("variants", "one pattern", 32, stream)
                ratios[f"{mode}_{'streamed' if stream else 'whole'}"]["one_pattern_32_pool_over_variant"] = (
                    one_32 / variant_32
                )
    return ratios


def extra_patterns(model_dir: Path, work: Path) -> Path:
    """A copy of the model's store with the two patterns of EXTRA_PATTERNS added: random selections (of the
    default share of experts) with their task's routing examples, so that eight patterns of different
    experts can share a batch."""
    store = work / "patterns"
    shutil.copytree(model_dir / "patterns", store)
    for name, (task, seed) in EXTRA_PATTERNS.items():
        prompts = work / f"{name}.jsonl"
        examples = get_task(task).examples(16, EVAL_SEED + 10 + seed)
        prompts.write_text("".join(json.dumps({"prompt": e.prompt}) + "\n" for e in examples))
        command = [sys.executable, "-m", "server.cli", "calibrate", "--model", str(model_dir), "--store", str(store)]
        command += ["--name", name, "--prompts", str(prompts), "--method", "random", "--seed", str(seed), "--quiet"]
        subprocess.run(command, check=True, capture_output=True)
    return store


def server_phases(args: argparse.Namespace, prompts: list[str], phases: set[str]) -> dict[str, Any]:
    """The overhead phase (on a pooled server with the model's own store, whose routing it measures) and the
    load phase (on servers whose store also holds the two extra patterns of the eight-pattern level)."""
    out: dict[str, Any] = {}
    if "overhead" in phases:
        with serving(args.model, args.budget, args.torch_threads, args.workers, pool_option(True)) as url:
            print("overhead: one request at a time, server vs direct generate ...", file=sys.stderr)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
            out["single_request"] = overhead(client, args.model, prompts, args.repeats)
    if "load" not in phases:
        return out
    load: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as work:
        store = ["--store", str(extra_patterns(args.model, Path(work)))]
        for pool in (True, False):
            with serving(args.model, args.budget, args.torch_threads, args.workers, pool_option(pool) + store) as url:
                print(f"HTTP load, expert pool {str(pool).lower()} ...", file=sys.stderr)
                warm_up(url, prompts, args.warmup_requests)
                load["pool" if pool else "variants"] = load_levels(url, prompts, args.requests_per_client, args.least)
    return out | {"load": load, "ratios": load_ratios(load)}


def union_budget(model_dir: Path) -> dict[str, int]:
    """What holding every stored pattern at once costs: per sparse layer, the union of the patterns' kept
    experts times one expert's bytes, summed; the budget adds one expert per layer of room. The pool
    spends a budget on slots that span every layer, so the budget is raised, if need be, until its slots
    cover the largest layer's union."""
    builder = VariantBuilder(model_dir)
    store = PatternStore(model_dir / "patterns", create=False)
    union_bytes, most, per_slot = 0, 0, 0
    for layer, sparse in builder.sparse_layers.items():
        union: set[int] = set()
        for name in store.names():
            kept = store.get(name).selection.kept(layer)
            union |= set(range(sparse.num_experts) if kept is None else kept)
        union_bytes += len(union) * builder.expert_bytes(layer)
        most, per_slot = max(most, len(union)), per_slot + builder.expert_bytes(layer)
    budget = max(union_bytes + per_slot, most * per_slot)
    return {"union_bytes": union_bytes, "budget_bytes": budget, "largest_layer_union": most}


def cycling(model_dir: Path, prompt: str, budget: dict[str, int], expert_pool: bool, threads: int) -> dict[str, Any]:
    """Each stored pattern asked in turn (one short request each) for CYCLING_ROUNDS rounds; what the
    rounds after the first evicted and loaded, from `/metrics`."""
    names = PatternStore(model_dir / "patterns", create=False).names()
    evicted = "taskmoe_pool_experts_evicted_total" if expert_pool else "taskmoe_cache_evictions_total"
    loaded = "taskmoe_pool_experts_loaded_total" if expert_pool else "taskmoe_cache_misses_total"
    with serving(model_dir, budget["budget_bytes"], threads, None, pool_option(expert_pool)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        for round_number in range(CYCLING_ROUNDS):
            for name in names:
                client.chat.completions.create(
                    model=f"demo-moe@{name}", messages=[{"role": "user", "content": prompt}], max_tokens=4
                )
            if round_number == 0:
                first = scrape(url)
        last = scrape(url)
    return {
        "expert_pool": expert_pool,
        **budget,
        "pool_slots": last.get("taskmoe_pool_slots") if expert_pool else None,  # every layer's together
        "patterns": len(names),
        "rounds": CYCLING_ROUNDS,
        "unit": "experts" if expert_pool else "variants",
        "evictions_first_round": first.get(evicted, 0.0),
        "evictions_after_first_round": last.get(evicted, 0.0) - first.get(evicted, 0.0),
        "loads_first_round": first.get(loaded, 0.0),
        "loads_after_first_round": last.get(loaded, 0.0) - first.get(loaded, 0.0),
        "misses": last.get("taskmoe_cache_misses_total", 0.0),
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


def stall(url: str, stream_tokens: int, long_prompt: str | None) -> dict[str, Any]:
    """16 streams decoding while (unless `long_prompt` is None) one long prompt arrives: the gaps between
    the streams' tokens as their clients see them, and the long prompt's time to first token."""
    streams_spec = {**load_spec(url, ["demo-moe"], ["Sort: 4, 2, 9, 1"], 16, 16, True), "max_tokens": stream_tokens}
    long_ttft_ms = 0.0
    with ThreadPoolExecutor(2) as pool:
        streams_future = pool.submit(run_generator, streams_spec)
        if long_prompt is not None:
            long_spec = {**load_spec(url, ["demo-moe"], [long_prompt], 1, 1, True), "max_tokens": 4}
            long = pool.submit(run_generator, {**long_spec, "start_delay": 0.5}).result()
            long_ttft_ms = summarise_load(long)["ttft_p50_ms"]
        streams = streams_future.result()
    summarise_load(streams)  # raises if a request failed
    gaps = [gap for r in streams["results"] for gap in r.get("gaps", [])]
    return {
        "long_prompt": long_prompt is not None,
        "streams": 16,
        "long_prompt_characters": len(long_prompt or ""),
        "gap_p50_ms": statistics.median(gaps) * 1000,
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        "gap_max_ms": max(gaps) * 1000,
        "long_prompt_ttft_ms": long_ttft_ms,
    }


def prefill_phase(model_dir: Path, threads: int, quick: bool) -> list[dict[str, Any]]:
    """Whole-prompt prefill (with the no-long-prompt baseline on the same server), then chunked."""
    long_model = long_context_copy(model_dir, 4096)
    long_prompt = ("the quick brown fox jumps over the lazy dog " * 60)[:LONG_PROMPT_CHARACTERS]
    stream_tokens = 60 if quick else 200
    rows = []
    for chunk in (None, 512) if quick else (None, 512, 128):
        options = ["--max-prefill-tokens", str(chunk or 0), "--served-model-name", "demo-moe"]
        with serving(long_model, "4GiB", threads, None, options) as url:
            if chunk is None:
                rows.append({**stall(url, stream_tokens, None), "max_prefill_tokens": None})
            rows.append({**stall(url, stream_tokens, long_prompt), "max_prefill_tokens": chunk})
    return rows


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the phases that ran: its threshold, what was measured, and whether it was met."""
    out: dict[str, dict[str, Any]] = {}

    def target(name: str, threshold: float, measured: float, at_least: bool) -> None:
        met = measured >= threshold if at_least else measured <= threshold
        out[name] = {"target": threshold, "measured": measured, "pass": met}

    if "single_request" in result:
        target("server_vs_direct_generate", 1.15, result["single_request"]["ratio"], at_least=False)
    if "routing" in result:
        target("routing_p50_ms", ROUTING_TARGET_MS, result["routing"]["p50_ms"], at_least=False)
    if "ratios" in result:
        for name, key, threshold in (
            ("one_pattern_32_vs_1_client", "one_pattern_32_over_1", SCALING_TARGET),
            ("three_patterns_vs_one_at_32_clients", "three_patterns_32_over_one_pattern_32", MIXED_TARGET),
            ("eight_patterns_vs_one_at_32_clients", "eight_patterns_32_over_one_pattern_32", EIGHT_TARGET),
            ("one_pattern_pool_vs_variant_at_32_clients", "one_pattern_32_pool_over_variant", POOL_VS_VARIANT_TARGET),
        ):
            target(name, threshold, result["ratios"]["pool_whole"][key], at_least=True)
            target(f"{name}_streamed", threshold, result["ratios"]["pool_streamed"][key], at_least=True)
        shares = [x["generator_cpu_share"] for levels in result["load"].values() for x in levels]
        target("load_generator_cpu_share_of_a_core", GENERATOR_CPU_LIMIT, max(shares), at_least=False)
    if "cycling" in result:
        pool_cycle = next(c for c in result["cycling"] if c["expert_pool"])
        target("evictions_after_first_round_with_the_pool", 0, pool_cycle["evictions_after_first_round"], False)
    return out


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-moe")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="the phases to run")
    parser.add_argument("--prompts-per-task", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt in the overhead phase")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="in-process decoding levels")
    parser.add_argument("--requests-per-client", type=int, default=4, help="HTTP load: requests per client")
    parser.add_argument("--least", type=int, default=8, help="HTTP load: the fewest requests of a level")
    parser.add_argument("--warmup-requests", type=int, default=12, help="per server and stream mode")
    parser.add_argument("--budget", default="4GiB", help="the load servers' --cache-budget")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads, server and direct alike")
    parser.add_argument("--workers", type=int, default=None, help="the server's --workers (default: its own)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: fewer prompts, requests, decoding and prefill levels; writes to a temporary file "
        "unless --out is given",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/server.json")
    args = parser.parse_args()
    if args.quick:
        args.prompts_per_task, args.repeats, args.clients = 2, 1, [1, 4]
        args.requests_per_client, args.least, args.warmup_requests = 1, 2, 3
    if args.out is None:
        quick_out = Path(tempfile.gettempdir()) / "taskmoe-bench-server-quick.json"
        args.out = quick_out if args.quick else ROOT / "bench" / "results" / "server.json"
    return args


def settings(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    model = args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
    return {
        "model": str(model),
        "phases": list(args.phases),
        "max_tokens": MAX_TOKENS,
        "load_max_tokens": LOAD_MAX_TOKENS,
        "prompts": len(prompts),
        "repeats": args.repeats,
        "requests_per_client": args.requests_per_client,
        "least_requests": args.least,
        "warmup_requests": args.warmup_requests,
        "budget": args.budget,
        "torch_threads": args.torch_threads,
        "workers": args.workers or "server default",
        "cpus": os.cpu_count(),
        "load_generator": "scripts/load_generator.py: asyncio + httpx, a process of its own",
        "quick": args.quick,
    }


def main() -> int:
    args = arguments()
    phases = set(args.phases)
    prompts = [e.prompt for task in TASKS for e in get_task(task).examples(args.prompts_per_task, EVAL_SEED + 1)]
    per_task = args.prompts_per_task
    mixed = [prompts[t * per_task + i] for i in range(per_task) for t in range(len(TASKS))]
    torch.set_num_threads(args.torch_threads)
    result: dict[str, Any] = {"settings": settings(args, mixed)}
    started = time.perf_counter()
    if phases & {"overhead", "load"}:
        result |= server_phases(args, mixed, phases)
    if "routing" in phases:
        print("routing cost ...", file=sys.stderr)
        result["routing"] = routing_cost(args.model, mixed)
    if "decoder" in phases:
        print("decoder scaling, in process ...", file=sys.stderr)
        result["decoder"] = decoder_scaling(args.model, mixed, args.clients)
    if "cycling" in phases:
        print("cycling through every pattern under a union budget ...", file=sys.stderr)
        budget = union_budget(args.model)
        result["cycling"] = [cycling(args.model, mixed[0], budget, pool, args.torch_threads) for pool in (True, False)]
    if "prefill" in phases:
        print("a long prompt among 16 streams ...", file=sys.stderr)
        result["prefill"] = prefill_phase(args.model, args.torch_threads, args.quick)
    result["targets"] = targets(result)
    result["settings"]["seconds"] = time.perf_counter() - started
    result["measured"] = measured()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(server_tables(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
