"""The block-FP8 part of `bench_variants.py` (`--fp8`): a pool of FP8 slots against a pool of bf16 slots.

A random block-FP8 checkpoint with Qwen3-30B-A3B's layer shape (128 experts of 2048 x 768, top-8; attention and
experts FP8 in 128 x 128 blocks with float32 scales, routers, norms, embeddings and the LM head in bf16, as the
official FP8 release stores them), `--fp8-layers` layers (3) and a small vocabulary. Each measurement runs in a
fresh subprocess with the page cache warm:

- a 50% pattern (64 random experts per layer) leased into an empty pool of FP8 slots (`--expert-dtype auto`)
  and into one of bf16 slots (dequantized when copied in): seconds, bytes read against the kept experts' FP8
  bytes plus scales (from the safetensors headers), and the copy floor of those very bytes;
- memory per slot, computed and allocated (RssAnon growth);
- decode step time under the pattern (batch 1 and 8, after a 16-token prompt), FP8 slots against bf16 slots.

Targets (from the issue): memory per FP8 slot <= 0.53x of a bf16 slot; the FP8 pool's load <= 1.5x the copy
floor of the bytes it reads, and bytes read = the kept experts' FP8 bytes + scales exactly.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import bench_variants as bench

#: Qwen3-30B-A3B's layer shape; the rest (vocabulary, ids, norms) as in the bf16 benchmark's model
FP8_SHAPE: dict[str, Any] = {
    **bench.SHAPE,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_attention_heads": 32,
    "head_dim": 128,
}
BLOCK = (128, 128)
FP8_FORMAT = 1
KEEP = 0.5
TARGET_SLOT_RATIO = 0.53
TARGET_LOAD_OVER_FLOOR = 1.5
STEP_BATCHES = (1, 8)
STEPS = 8


def fp8_specs(num_layers: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, quantized) of every weight, in hub naming and write order."""
    s = FP8_SHAPE
    hidden, inter, head_dim = s["hidden_size"], s["moe_intermediate_size"], s["head_dim"]
    specs: list[tuple[str, tuple[int, ...], bool]] = [("model.embed_tokens.weight", (s["vocab_size"], hidden), False)]
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        specs += [
            (f"{p}.input_layernorm.weight", (hidden,), False),
            (f"{p}.post_attention_layernorm.weight", (hidden,), False),
            (f"{p}.self_attn.q_proj.weight", (s["num_attention_heads"] * head_dim, hidden), True),
            (f"{p}.self_attn.k_proj.weight", (s["num_key_value_heads"] * head_dim, hidden), True),
            (f"{p}.self_attn.v_proj.weight", (s["num_key_value_heads"] * head_dim, hidden), True),
            (f"{p}.self_attn.o_proj.weight", (hidden, s["num_attention_heads"] * head_dim), True),
            (f"{p}.self_attn.q_norm.weight", (head_dim,), False),
            (f"{p}.self_attn.k_norm.weight", (head_dim,), False),
            (f"{p}.mlp.gate.weight", (s["num_experts"], hidden), False),
        ]
        for expert in range(s["num_experts"]):
            specs += [
                (f"{p}.mlp.experts.{expert}.gate_proj.weight", (inter, hidden), True),
                (f"{p}.mlp.experts.{expert}.up_proj.weight", (inter, hidden), True),
                (f"{p}.mlp.experts.{expert}.down_proj.weight", (hidden, inter), True),
            ]
    specs += [("model.norm.weight", (hidden,), False), ("lm_head.weight", (s["vocab_size"], hidden), False)]
    return specs


def _random_fp8(shape: tuple[int, ...], generator: Any) -> Any:
    """Random e4m3 values of moderate size (exponent field kept small, so no NaN and no overflow)."""
    import torch

    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    raw = (raw & 0x87) | 0x30  # sign, a mid exponent, any mantissa: |x| in [0.5, 2)
    return raw.view(torch.float8_e4m3fn)


def write_fp8_checkpoint(directory: Path, num_layers: int, seed: int) -> None:
    """The random FP8 checkpoint in ~500 MB shards with an index, moved into place when complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    scratch = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    size, number, total = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, number
        number += 1
        name = f"model-{number:05d}.safetensors"
        save_file(shard, str(scratch / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape, quantized in fp8_specs(num_layers):
        if quantized:
            grid = (math.ceil(shape[0] / BLOCK[0]), math.ceil(shape[1] / BLOCK[1]))
            tensors = {name: _random_fp8(shape, generator), f"{name}_scale_inv": torch.rand(grid) * 0.02 + 0.001}
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            tensors = {name: tensor.fill_(1.0) if len(shape) == 1 else tensor.normal_(0, 0.02, generator=generator)}
        for key, tensor in tensors.items():
            shard[key] = tensor
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
        if size >= bench.SHARD_BYTES:
            flush()
    if shard:
        flush()
    (scratch / bench.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = Qwen3MoeConfig(**FP8_SHAPE, num_hidden_layers=num_layers, dtype="bfloat16").to_dict()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
        "modules_to_not_convert": ["gate", "lm_head"],
    }
    (scratch / "config.json").write_text(json.dumps(config, indent=1))
    (scratch / bench.META_FILE).write_text(json.dumps(_spec(num_layers, seed), sort_keys=True))
    scratch.rename(directory)


def _spec(num_layers: int, seed: int) -> dict[str, Any]:
    return {"format": FP8_FORMAT, "layers": num_layers, "seed": seed, "shape": FP8_SHAPE, "block": list(BLOCK)}


def ensure_fp8_checkpoint(directory: Path, num_layers: int, seed: int) -> None:
    meta = directory / bench.META_FILE
    if meta.is_file() and json.loads(meta.read_text()) == json.loads(json.dumps(_spec(num_layers, seed))):
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    bench._log(f"making a random block-FP8 checkpoint ({num_layers} layers of 128 x 2048 x 768) in {directory}")
    write_fp8_checkpoint(directory, num_layers, seed)


def pattern(num_layers: int, seed: int) -> dict[int, list[int]]:
    count = round(KEEP * FP8_SHAPE["num_experts"])
    return {
        layer: sorted(random.Random(f"{seed}:fp8:{layer}").sample(range(FP8_SHAPE["num_experts"]), count))
        for layer in range(num_layers)
    }


def measure_fp8_pool(directory: Path, expert_dtype: str, seed: int) -> dict[str, Any]:
    """One pool (FP8 or bf16 slots): the 50% pattern leased into it empty, then decode steps under it."""
    import numpy as np
    import torch

    from server.cache import VariantKey
    from server.expert_pool import ExpertPool
    from server.model.pooled import PooledModel, RowRoute
    from server.model.variant import VariantBuilder

    num_layers = json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    kept = pattern(num_layers, seed)
    ranges = bench.expert_ranges(directory, kept)
    expected = sum(length for _, _, length in ranges)
    scratch = np.empty(expected, dtype=np.uint8)
    scratch.fill(0)
    maps: dict[Path, mmap.mmap] = {}
    floor = bench._copy_ranges(scratch, ranges, maps)
    for mapped in maps.values():
        mapped.close()
    del scratch
    rss_start = bench.rss("RssAnon")
    builder = VariantBuilder(directory, "cpu", "bfloat16")
    slots = len(kept[0])
    pooled = PooledModel(builder, slots, expert_dtype=expert_dtype)
    backbone = builder.backbone_bytes
    rss_slots = bench.rss("RssAnon") - rss_start - backbone
    pool = ExpertPool(pooled)
    before = builder.reader.bytes_read
    started = time.perf_counter()
    lease = pool.acquire(VariantKey("half"), RowRoute("half", {k: tuple(v) for k, v in kept.items()}))
    load = time.perf_counter() - started
    read = builder.reader.bytes_read - before
    steps = {f"step_b{batch}_s": _step_time(lease.model, batch) for batch in STEP_BATCHES}
    pool.release(lease)
    return {
        "expert_dtype": pooled.expert_dtype,
        "load_s": load,
        "floor_s": floor,
        "bytes_read": read,
        "expected_bytes": expected,
        "slot_bytes_per_expert": pooled.expert_bytes(0),
        "slot_bytes": pooled.slot_bytes,
        "rss_anon_slots_bytes": rss_slots,
        "backbone_bytes": backbone,
        "slots_per_layer": slots,
        "torch_threads": torch.get_num_threads(),
        **steps,
    }


def _step_time(model: Any, batch: int) -> float:
    """Median seconds of a one-token decode step for `batch` rows after a 16-token prompt."""
    import torch
    from transformers import DynamicCache

    from server.model.kv_cache import cache_argument

    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(3, FP8_SHAPE["vocab_size"], (batch, 16), generator=generator)
    cache = DynamicCache(config=model.config)
    times = []
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, **cache_argument(model.pooled.model, cache))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(STEPS):
            started = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **cache_argument(model.pooled.model, cache))
            times.append(time.perf_counter() - started)
            token = out.logits[:, -1:].argmax(-1)
    return statistics.median(times[1:])


def run(directory: Path, num_layers: int, repeats: int, threads: int | None, seed: int) -> dict[str, Any]:
    """Alternating FP8 and bf16 runs, each in a fresh process; medians and every sample."""
    ensure_fp8_checkpoint(directory, num_layers, seed)
    samples: dict[str, list[dict[str, Any]]] = {"fp8": [], "bfloat16": []}
    bench.run_worker(
        {
            "kind": "fp8-pool",
            "dir": str(directory),
            "expert_dtype": "auto",
            "seed": seed,
            "threads": threads,
            "cold": False,
        }
    )  # fills the page cache: every timed run is warm
    for repeat in range(repeats):
        for expert_dtype in ("auto", "bfloat16") if repeat % 2 == 0 else ("bfloat16", "auto"):
            spec = {
                "kind": "fp8-pool",
                "dir": str(directory),
                "expert_dtype": expert_dtype,
                "seed": seed,
                "threads": threads,
                "cold": False,
            }
            result = bench.run_worker(spec)
            samples[result["expert_dtype"]].append(result)
            bench._log(f"  fp8 pool, {result['expert_dtype']} slots: load {result['load_s']:.2f} s")
    return {name: {"median": bench._median(runs), "samples": runs} for name, runs in samples.items()}


def summarise(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Targets and the table (markdown) of the FP8 measurements."""
    fp8, bf16 = results["fp8"]["median"], results["bfloat16"]["median"]
    targets = [
        {
            "target": "memory per FP8 slot / bf16 slot",
            "value": fp8["slot_bytes_per_expert"] / bf16["slot_bytes_per_expert"],
            "limit": TARGET_SLOT_RATIO,
        },
        {
            "target": "FP8 pool load / copy floor of its bytes",
            "value": fp8["load_s"] / fp8["floor_s"],
            "limit": TARGET_LOAD_OVER_FLOOR,
        },
        {
            "target": "FP8 pool bytes read / kept experts' FP8 bytes + scales",
            "value": fp8["bytes_read"] / fp8["expected_bytes"],
            "limit": 1.0,
        },
    ]
    for target in targets:
        target["met"] = target["value"] <= target["limit"] + 1e-12
    rows = [
        "| 50% pattern, Qwen3-30B-A3B layer shape (medians) | FP8 slots | bf16 slots |",
        "|---|---|---|",
        f"| bytes per expert slot | {fp8['slot_bytes_per_expert']:,} | {bf16['slot_bytes_per_expert']:,} |",
        "| slot memory, RssAnon growth | "
        f"{bench._mib(fp8['rss_anon_slots_bytes'])} | {bench._mib(bf16['rss_anon_slots_bytes'])} |",
        f"| load into an empty pool | {bench._secs(fp8['load_s'])} | {bench._secs(bf16['load_s'])} |",
        f"| copy floor of the bytes read | {bench._secs(fp8['floor_s'])} | {bench._secs(bf16['floor_s'])} |",
        f"| bytes read | {bench._mib(fp8['bytes_read'])} | {bench._mib(bf16['bytes_read'])} |",
    ]
    rows += [
        f"| decode step, batch {b} | {bench._secs(fp8[f'step_b{b}_s'])} | {bench._secs(bf16[f'step_b{b}_s'])} |"
        for b in STEP_BATCHES
    ]
    return targets, "\n".join(rows)
