"""Decode steps of the expert pool on a model of Qwen3-30B-A3B's layer shape, on the CPU or a CUDA device.

    python scripts/bench_core.py                          # CPU: 2 layers, bf16, batch 1, 8, 32 -> core_cpu.json
    python scripts/bench_core.py --device cuda            # what `make gpu-check` runs: 8 layers, batch 1..128
    python scripts/bench_core.py --quick --dir /tmp/core  # tiny shapes, seconds: proves the script runs

A random checkpoint in the Qwen3-MoE hub layout (`bench_variants.py`'s writer: per-expert bf16 tensors in
~500 MB shards with an index, cached under bench/checkpoints/) with Qwen3-30B-A3B's layer shape: hidden 2048,
128 experts of 2048 x 768, top-8 with `norm_topk_prob`, 32 query / 4 KV heads of 128; a 4,096-token
vocabulary keeps it small. Three patterns of half the experts each, overlapping pairwise in a quarter of them
(their union, three quarters, is the pool's slots), are leased into an `ExpertPool`. After a 16-token prompt
per row, each decode step is timed (medians of `--steps`):

- one pattern through the pool, and three patterns mixed (rows round robin), at each batch size;
- on the CPU also the pattern's own variant (`VariantBuilder.build`), and each step split into routing (the
  routers' forward), expert compute (the experts modules' forward) and the rest, with forward hooks;
- a task switch: leasing a pattern whose experts are not resident, against the copy floor of the bytes it
  reads (pinned host -> device on CUDA, a host copy on the CPU), measured in the same run;
- the decode step at batch 1 against the time the device needs to read the bytes that step must read
  (attention, norms, routers, 8 experts per layer, one embedding row, the LM head) at its read bandwidth,
  measured in the same run (the faster of a large reduction and a device-to-device copy).

It prints a table and writes JSON (`--out`) with the "measured" stamp; `scripts/gpu_check.py` runs the CUDA
mode and adds the GPU tests' outcome. Needs only torch, transformers, safetensors and numpy beside the
project's source (no faiss, no embedder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without the package installed (the GPU image)
    sys.path.insert(0, str(ROOT))

import bench_variants as checkpoints  # noqa: E402 (the random hub-layout checkpoint writer)
from _fp8_bench import FP8_SHAPE  # noqa: E402

from _measured import measured  # noqa: E402

#: Qwen3-30B-A3B's layer shape (as the FP8 benchmark's), with a small vocabulary
CORE_SHAPE: dict[str, Any] = {**FP8_SHAPE, "vocab_size": 4096}
#: `--quick`: the same structure in tiny shapes, so that the whole script runs in seconds (the test's mode)
QUICK_SHAPE: dict[str, Any] = {
    **CORE_SHAPE,
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}
ONE, MIXED, VARIANT = "pool, one pattern", "pool, three patterns mixed", "the pattern's variant"
GRAPHED = " (static cache, CUDA graph)"  # the same, decoded by `static_rows.StaticRows` on CUDA
STATIC = " (static cache, eager)"  # and on the CPU, where there are no graphs
TARGET_MIXED_OVER_ONE = 0.9  # three patterns mixed at batch 32 against one pattern (tokens/s)
TARGET_POOL_OVER_VARIANT = 0.97  # one pattern through the pool at batch 32 against its variant (CPU)
TARGET_STEP_OVER_READ = 3.0  # decode at batch 1 against the time to read its bytes (GPU)


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    device: str
    dtype: str
    layers: int
    batches: tuple[int, ...]
    steps: int
    warmup: int
    prompt: int
    seed: int
    variant: bool  # also the pattern's own variant
    split: bool  # split each step into routing, experts and the rest
    quick: bool
    directory: Path = field(default=Path())

    @property
    def shape(self) -> dict[str, Any]:
        return QUICK_SHAPE if self.quick else CORE_SHAPE


# -- the checkpoint and the patterns ---------------------------------------------------------------


def ensure_checkpoint(settings: Settings) -> Path:
    """The random checkpoint of `settings.layers` layers (made unless a matching one is there)."""
    config = checkpoints.make_config(settings.layers, settings.shape).to_dict()
    config.pop("transformers_version", None)
    spec = {
        "format": checkpoints.CHECKPOINT_FORMAT,
        "seed": settings.seed,
        "shard_bytes": checkpoints.SHARD_BYTES,
        "config": config,
    }
    checkpoints.ensure_checkpoint_of(settings.directory, spec, settings.shape)
    return settings.directory


def overlapping_patterns(layers: Sequence[int], num_experts: int, seed: int) -> dict[str, dict[int, tuple[int, ...]]]:
    """Per layer a random order P of the experts, h = half and q = a quarter of them: a = P[:h], b = P[q:q+h],
    c = P[:q] + P[h:h+q] (each pair shares q experts, the three together 3/4 of them), and d = P[h:] (half
    resident after the three, half not: a switch that evicts)."""
    half, quarter = num_experts // 2, num_experts // 4
    found: dict[str, dict[int, tuple[int, ...]]] = {name: {} for name in "abcd"}
    for layer in layers:
        order = list(range(num_experts))
        random.Random(f"{seed}:{layer}").shuffle(order)
        found["a"][layer] = tuple(sorted(order[:half]))
        found["b"][layer] = tuple(sorted(order[quarter : quarter + half]))
        found["c"][layer] = tuple(sorted(order[:quarter] + order[half : half + quarter]))
        found["d"][layer] = tuple(sorted(order[half:]))
    return found


# -- timing ----------------------------------------------------------------------------------------


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepSplit:
    """Seconds spent inside the routers' and the experts modules' forward passes, from forward hooks (the
    pool's routers are patched per instance, which the module's hooks wrap all the same), and the distinct
    experts the step's rows chose, summed over the sparse layers: the expert weights a step must read."""

    def __init__(self, model: Any, builder: Any, device: Any) -> None:
        from server.model.masking import router_of

        self.device = device
        self.seconds = {"routing": 0.0, "experts": 0.0, "experts_read": 0.0}
        self._handles = []
        for layer in builder.sparse_layers.values():
            block = model.get_submodule(layer.prefix)
            for part, module in (("routing", router_of(block, builder.family)), ("experts", block.experts)):
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(self._stop(part)))
        self._started = 0.0

    def _start(self, module: Any, args: Any) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _stop(self, part: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            synchronize(self.device)
            self.seconds[part] += time.perf_counter() - self._started
            if part == "experts" and len(args) > 1:  # (hidden states, chosen experts [tokens, k], weights)
                self.seconds["experts_read"] += int(args[1].unique().numel())  # after the clock: not timed

        return hook

    def take(self) -> dict[str, float]:
        """The seconds since the last `take`, and a fresh count."""
        taken, self.seconds = self.seconds, {"routing": 0.0, "experts": 0.0, "experts_read": 0.0}
        return taken

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


Forward = Callable[[Any, Any], Any]  # (input ids, cache) -> logits of the last position


def decode_samples(
    modes: Sequence[tuple[Forward, StepSplit | None]], config: Any, batch: int, settings: Settings
) -> list[list[dict[str, float]]]:
    """Per mode, per timed decode step: {"seconds", and with a split "routing", "experts"}. Each mode decodes
    its own rows (the same `settings.prompt`-token prompts, its own cache); the modes take their steps in
    turn, so that a machine whose load changes slows them alike, and `settings.warmup` steps go untimed."""
    import torch

    from server.model.kv_cache import new_cache

    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, int(config.vocab_size), (batch, settings.prompt), generator=generator).to(settings.device)
    caches = [new_cache(config) for _ in modes]
    samples: list[list[dict[str, float]]] = [[] for _ in modes]
    with torch.inference_mode():
        tokens = [
            forward(ids, cache).argmax(-1, keepdim=True) for (forward, _), cache in zip(modes, caches, strict=True)
        ]
        for step in range(settings.warmup + settings.steps):
            for index, ((forward, split), cache) in enumerate(zip(modes, caches, strict=True)):
                synchronize(settings.device)
                if split is not None:
                    split.take()
                started = time.perf_counter()
                tokens[index] = forward(tokens[index], cache).argmax(-1, keepdim=True)
                synchronize(settings.device)
                seconds = time.perf_counter() - started
                if step >= settings.warmup:
                    samples[index].append({"seconds": seconds, **(split.take() if split is not None else {})})
    return samples


def step_row(mode: str, batch: int, samples: list[dict[str, float]]) -> dict[str, Any]:
    """A table row: the median step and tokens/s, with every sample, and the split's medians in ms."""
    seconds = statistics.median(s["seconds"] for s in samples)
    row: dict[str, Any] = {
        "mode": mode,
        "batch": batch,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": batch / seconds,
        "samples_ms": [round(1e3 * s["seconds"], 3) for s in samples],
    }
    if "routing" in samples[0]:
        routing = statistics.median(s["routing"] for s in samples)
        experts = statistics.median(s["experts"] for s in samples)
        row["split_ms"] = {
            "routing": 1e3 * routing,
            "experts": 1e3 * experts,
            "rest": 1e3 * (seconds - routing - experts),
        }
        row["experts_read"] = statistics.median(s["experts_read"] for s in samples)
    return row


# -- the floors: copy and read bandwidth ------------------------------------------------------------


def copy_floor_seconds(nbytes: int, device: str, repeats: int = 3) -> float:
    """The fastest of `repeats` plain copies of `nbytes`: pinned host -> device on CUDA, host -> host (into
    touched memory) on the CPU."""
    import torch

    cuda = torch.device(device).type == "cuda"
    source = torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda)
    target = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source, non_blocking=cuda)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def read_bandwidth(device: str, nbytes: int) -> dict[str, float]:
    """Bytes per second the device reads: a float32 sum over `nbytes` (reads them once) and a copy of them
    (counted as read plus written); the best of three each, and the faster of the two as `bytes_per_s`."""
    import torch

    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    copy = torch.empty_like(data)
    best = {"sum": float("inf"), "copy": float("inf")}
    for _ in range(3):
        for name, run in (("sum", data.sum), ("copy", lambda: copy.copy_(data))):
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - started)
    rates = {"sum_bytes_per_s": nbytes / best["sum"], "copy_bytes_per_s": 2 * nbytes / best["copy"]}
    return {**rates, "bytes_per_s": max(rates.values()), "buffer_bytes": nbytes}


def step_read_bytes(pooled: Any, top_k: int) -> int:
    """Bytes a decode step of one row must read: every weight but the expert slots and the embedding table,
    one embedding row, and `top_k` experts per sparse layer (the KV cache of a short prompt is left out)."""
    model = pooled.model
    fixed = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".experts." in name or "embed_tokens" in name or "rotary_emb" in name:
            continue
        fixed += tensor.numel() * tensor.element_size()
    embedding = model.get_input_embeddings().weight
    row = embedding.shape[1] * embedding.element_size()
    return fixed + row + sum(top_k * pooled.expert_bytes(layer) for layer in pooled.layers)


# -- the run ---------------------------------------------------------------------------------------


def pooled_forward(pooled: Any, routes: list[Any]) -> Forward:
    """A decode forward of the pooled model with row i routed as `routes[i]` (rows beyond repeat them)."""
    from server.model.kv_cache import cache_argument

    def forward(ids: Any, cache: Any) -> Any:
        rows = [routes[row % len(routes)] for row in range(ids.shape[0])]
        with pooled.rows(rows):
            output = pooled.model(
                input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(pooled.model, cache)
            )
        return output.logits[:, -1]

    return forward


def model_forward(model: Any) -> Forward:
    from server.model.kv_cache import cache_argument

    def forward(ids: Any, cache: Any) -> Any:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(model, cache)).logits[:, -1]

    return forward


def lease_timed(pool: Any, name: str, kept: dict[int, tuple[int, ...]], device: str) -> tuple[Any, dict[str, Any]]:
    """Lease pattern `name`, timed to the end of its copies: (lease, {experts loaded, bytes, seconds})."""
    from server.cache import VariantKey
    from server.model.pooled import RowRoute

    synchronize(device)
    started = time.perf_counter()
    lease = pool.acquire(VariantKey(name), RowRoute(name, kept))
    synchronize(device)
    seconds = time.perf_counter() - started
    per_expert = pool.pooled.expert_bytes(next(iter(kept)))  # every layer has the same shape
    return lease, {
        "pattern": name,
        "experts_loaded": lease.loaded,
        "bytes": lease.loaded * per_expert,
        "seconds": seconds,
    }


def measure_steps(settings: Settings, pool: Any, leases: dict[str, Any], variant: Any) -> list[dict[str, Any]]:
    """Rows of decode steps: per batch size, one pattern, three mixed and (when built) the variant, in turn."""
    pooled, builder = pool.pooled, pool.pooled.builder
    splits = {}
    if settings.split:  # one per model: the pool's two modes share its hooks, their steps never overlap
        splits = {id(model): StepSplit(model, builder, settings.device) for model in (pooled.model, variant) if model}
    modes = [
        (ONE, pooled_forward(pooled, [leases["a"].route]), pooled.model),
        (MIXED, pooled_forward(pooled, [leases[name].route for name in "abc"]), pooled.model),
    ]
    if variant is not None:
        modes.append((VARIANT, model_forward(variant), variant))
    rows = []
    try:
        for batch in settings.batches:
            runs = [(forward, splits.get(id(model))) for _, forward, model in modes]
            for (mode, _, _), samples in zip(modes, decode_samples(runs, builder.config, batch, settings), strict=True):
                rows.append(step_row(mode, batch, samples))
                _log(f"  batch {batch:>3} {mode}: {rows[-1]['step_ms']:.1f} ms a step")
    finally:
        for split in splits.values():
            split.remove()
    return rows


def graph_rows(settings: Settings, pool: Any, leases: dict[str, Any]) -> list[dict[str, Any]]:
    """One pattern and three mixed decoded as the server decodes them on a GPU (`static_rows.StaticRows`): a
    static cache and, on CUDA, each step size captured once as a CUDA graph and replayed (on the CPU the same
    steps run eagerly, in quick runs only, so that the path is exercised). A step's time includes reading
    its tokens back, as the server's sampling does. The two take their steps in turn, as in
    `decode_samples`."""
    import torch

    from server.model.kv_cache import cache_argument, new_cache
    from server.static_rows import StaticRows

    pooled = pool.pooled
    graph = settings.device == "cuda"
    config = pooled.builder.config
    rows = []
    for batch in settings.batches:
        routes = {
            ONE: [leases["a"].route] * batch,
            MIXED: [leases["abc"[row % 3]].route for row in range(batch)],
        }
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, int(config.vocab_size), (batch, settings.prompt), generator=generator)
        ids = ids.to(settings.device)
        length = settings.prompt + settings.warmup + settings.steps + 1
        batches = {mode: StaticRows(pooled, batch, length, graphs=graph) for mode in routes}
        for mode, rows_of in batches.items():
            cache = new_cache(config)
            with torch.no_grad(), pooled.rows(routes[mode]):
                out = pooled.model(input_ids=ids, use_cache=True, **cache_argument(pooled.model, cache))
            mask, index = torch.ones_like(ids), torch.arange(batch, device=ids.device)
            first = out.logits[:, -1].argmax(-1)
            rows_of.join(list(range(batch)), routes[mode], cache, mask, index, mask.sum(-1), first)
            del cache, out
        samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in batches}
        for index in range(settings.warmup + settings.steps):
            for mode, rows_of in batches.items():
                synchronize(settings.device)
                started = time.perf_counter()
                tokens = rows_of.step().argmax(-1).tolist()
                rows_of.advance(list(range(batch)), tokens, rows_of.requests)
                synchronize(settings.device)
                if index >= settings.warmup:
                    samples[mode].append({"seconds": time.perf_counter() - started})
        suffix = GRAPHED if graph else STATIC
        for mode, found in samples.items():
            rows.append(step_row(mode + suffix, batch, found))
            _log(f"  batch {batch:>3} {mode + suffix}: {rows[-1]['step_ms']:.1f} ms a step")
        del batches
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: three mixed / one pattern and one pattern / its variant, in tokens/s."""
    speed = {(row["batch"], row["mode"]): row["tokens_per_s"] for row in rows}
    found = []
    for batch in sorted({row["batch"] for row in rows}):
        entry: dict[str, Any] = {"batch": batch, "mixed_over_one": speed[batch, MIXED] / speed[batch, ONE]}
        if (batch, VARIANT) in speed:
            entry["pool_over_variant"] = speed[batch, ONE] / speed[batch, VARIANT]
        for suffix in (GRAPHED, STATIC):
            if (batch, ONE + suffix) in speed:
                entry["static_mixed_over_one"] = speed[batch, MIXED + suffix] / speed[batch, ONE + suffix]
                entry["static_over_dynamic"] = speed[batch, ONE + suffix] / speed[batch, ONE]
        found.append(entry)
    return found


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets this run can check, at batch 32 (the largest batch below it in a quick run)."""
    by_batch = {entry["batch"]: entry for entry in report["ratios"]}
    batch = 32 if 32 in by_batch else max(b for b in by_batch if b <= 32)
    found = [("mixed_over_one", by_batch[batch]["mixed_over_one"], TARGET_MIXED_OVER_ONE, True, batch)]
    if "pool_over_variant" in by_batch[batch]:
        found.append(("pool_over_variant", by_batch[batch]["pool_over_variant"], TARGET_POOL_OVER_VARIANT, True, batch))
    if report["settings"]["device"] == "cuda":
        found.append(("step_over_read", report["decode_read"]["over_floor"], TARGET_STEP_OVER_READ, False, 1))
    return [
        {"name": name, "batch": b, "value": value, "limit": limit, "at_least": at_least,
         "met": value >= limit if at_least else value <= limit}
        for name, value, limit, at_least, b in found
    ]  # fmt: skip


def floors(settings: Settings, pool: Any, switches: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict:
    """The switches against their copy floors, and the batch-1 step against the time to read its bytes."""
    for switch in switches:
        switch["floor_seconds"] = copy_floor_seconds(switch["bytes"], settings.device) if switch["bytes"] else None
        switch["over_floor"] = switch["seconds"] / switch["floor_seconds"] if switch["bytes"] else None
    buffer = (16 if settings.quick else 4096 if settings.device == "cuda" else 512) * 1024**2
    bandwidth = read_bandwidth(settings.device, buffer)
    nbytes = step_read_bytes(pool.pooled, int(pool.pooled.builder.config.num_experts_per_tok))
    # the batch-1 step as the server can run it: the captured graph where there is one
    fastest = ONE + GRAPHED if any(row["mode"] == ONE + GRAPHED for row in rows) else ONE
    step = next(row for row in rows if row["batch"] == min(settings.batches) and row["mode"] == fastest)
    read_ms = 1e3 * nbytes / bandwidth["bytes_per_s"]
    decode = {
        "batch": step["batch"],
        "mode": step["mode"],
        "bytes": nbytes,
        "read_ms": read_ms,
        "step_ms": step["step_ms"],
    }
    return {"bandwidth": bandwidth, "decode_read": {**decode, "over_floor": step["step_ms"] / read_ms}}


def machine(settings: Settings) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg()[0],
    }
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
    return info


def run(settings: Settings) -> dict[str, Any]:
    """Make (or find) the checkpoint, lease the patterns, time the decode steps and the floors: the report."""
    from pattern_store.selection import Selection
    from server.expert_pool import ExpertPool
    from server.model.pooled import PooledModel
    from server.model.variant import VariantBuilder

    report: dict[str, Any] = {"measured": measured(), "machine": machine(settings)}
    directory = ensure_checkpoint(settings)
    builder = VariantBuilder(directory, device=settings.device, dtype=settings.dtype)
    num_experts = int(builder.config.num_experts)
    patterns = overlapping_patterns(sorted(builder.sparse_layers), num_experts, settings.seed)
    slots = num_experts * 3 // 4  # the union of a, b and c
    pool = ExpertPool(PooledModel(builder, slots=slots))
    leases, switches = {}, []
    for name in "abc":
        leases[name], switch = lease_timed(pool, name, patterns[name], settings.device)
        switches.append(switch)
    variant = None
    if settings.variant:
        variant = builder.build(Selection("moe_experts", {k: list(v) for k, v in patterns["a"].items()}))
    rows = measure_steps(settings, pool, leases, variant)
    del variant
    if settings.device == "cuda" or settings.quick:
        rows += graph_rows(settings, pool, leases)
    for lease in leases.values():
        pool.release(lease)
    lease, switch = lease_timed(pool, "d", patterns["d"], settings.device)  # half of d resident: evicts
    pool.release(lease)
    switches.append({**switch, "evicted": pool.evicted_experts})
    report["settings"] = {
        **{k: v for k, v in asdict(settings).items() if k not in ("directory", "quick")},
        "quick": settings.quick,
        "shape": {k: settings.shape[k] for k in ("hidden_size", "moe_intermediate_size", "num_experts",
                                                  "num_experts_per_tok", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim", "vocab_size")},
        "slots": slots,
        "kept_per_layer": num_experts // 2,
        "expert_bytes": pool.pooled.expert_bytes(next(iter(builder.sparse_layers))),
    }  # fmt: skip
    report.update(steps=rows, ratios=ratios(rows), switches=switches, **floors(settings, pool, switches, rows))
    report["targets"] = targets(report)
    return report


def settings_from(args: argparse.Namespace) -> Settings:
    cpu = args.device == "cpu"
    default_batches = (1, 4) if args.quick else (1, 8, 32) if cpu else (1, 8, 32, 128)
    layers = args.layers or (2 if args.quick or cpu else 8)
    default_dir = ROOT / "bench" / "checkpoints" / f"core-{layers}l{'-quick' if args.quick else ''}"
    return Settings(
        device=args.device,
        dtype=args.dtype,
        layers=layers,
        batches=tuple(args.batches or default_batches),
        steps=args.steps or (2 if args.quick else 5),
        warmup=1,
        prompt=4 if args.quick else 16,
        seed=args.seed,
        variant=cpu if args.variant is None else args.variant,
        split=cpu if args.split is None else args.split,
        quick=args.quick,
        directory=(args.dir or default_dir).resolve(),
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the pool and the variant (bfloat16)")
    parser.add_argument("--layers", type=int, help="layers of the checkpoint (CPU 2, CUDA 8)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (CPU 1 8 32, CUDA 1 8 32 128)")
    parser.add_argument("--steps", type=int, help="timed decode steps per case, after one untimed (5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action=argparse.BooleanOptionalAction, help="time the variant (CPU: yes)")
    parser.add_argument("--split", action=argparse.BooleanOptionalAction, help="split each step (CPU: yes)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the whole script in seconds")
    parser.add_argument("--dir", type=Path, help="the checkpoint's directory (default under bench/checkpoints/)")
    parser.add_argument("--out", type=Path, help="the JSON (default bench/results/core_cpu.json; none with --quick)")
    return parser


def write(report: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        _log(f"wrote {out}")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from tables_core import core_table

    args = parser().parse_args(argv)
    settings = settings_from(args)
    report = run(settings)
    print(core_table(report))
    default_out = None if args.quick else ROOT / "bench" / "results" / f"core_{settings.device}.json"
    write(report, args.out or default_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
