"""Layer-by-layer calibration: the same statistics as the full model, at a fraction of its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from pattern_store.expert_scores import output_sums
from pattern_store.tcess import tcess_sums
from server.model.calibrate import collect_statistics
from server.model.variant import VariantBuilder

from tiny_models import dense_configs, moe_configs, save_random_model

ROOT = Path(__file__).resolve().parents[1]


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7)]


#: families whose calibration scores are the router's sigmoid (DeepSeek-V3's router and MiniMax-M2's)
SIGMOID = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "minimax_m2")


def _expert_output(experts: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """E_j(x) written out from the fused weights: down(silu(gate(x)) * up(x)); gpt-oss's transposed weights
    with biases, interleaved gate and up, clamped: down((up + 1) * gate * sigmoid(alpha * gate))."""
    if hasattr(experts, "gate_up_proj_bias"):
        both = x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
        gate, up = both[..., 0::2].clamp(max=experts.limit), both[..., 1::2].clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return hidden @ experts.down_proj[expert] + experts.down_proj_bias[expert]
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[expert])


def _reference_statistics(directory, model_type: str) -> dict[int, dict[str, torch.Tensor]]:
    """One prompt at a time through the whole model, with hooks: the sums every score is made of."""
    full = AutoModelForCausalLM.from_pretrained(directory).eval()
    reference: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(full.model.layers):
        block = layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp  # Granite: the former
        experts = getattr(block, "experts", None)
        router = getattr(block, "router", None) or getattr(block, "gate", None)
        if experts is not None:
            seen: dict[str, torch.Tensor] = {}

            def on_residual(module, args, seen=seen):
                seen["residual"] = args[0].reshape(-1, args[0].shape[-1])

            def on_normed(module, args, output, seen=seen):
                seen["normed"] = output.reshape(-1, output.shape[-1])

            def on_router(module, args, output, index=index, seen=seen):
                logits, weights, selected = output
                gates = torch.sigmoid(logits.float()) if model_type in SIGMOID else torch.softmax(logits, -1)
                sums = reference.setdefault(index, {})
                sums["tcess"] = sums.get("tcess", 0) + tcess_sums(gates, selected.reshape(-1, selected.shape[-1]))
                seen["weights"], seen["selected"] = weights, selected

            def on_experts(module, args, output, index=index, seen=seen, experts=experts, layer=layer):
                x = args[0]
                norms = torch.stack(
                    [
                        torch.stack([_expert_output(experts, int(e), x[t]).norm() for e in seen["selected"][t]])
                        for t in range(x.shape[0])
                    ]
                )
                residual = seen["residual"]
                added = output * getattr(layer, "residual_multiplier", 1.0)  # Granite scales the branch it adds
                if hasattr(layer, "mlp_alpha_factor"):  # MiniMax: residual * alpha + mlp(residual) * beta
                    residual = seen["normed"] * layer.mlp_alpha_factor
                    added = output * layer.mlp_beta_factor
                change = 1 - torch.nn.functional.cosine_similarity(residual, residual + added, dim=-1)
                sums = reference[index]
                for name, value in zip(
                    ("reap", "ean", "easy_ep"),
                    output_sums(seen["weights"], seen["selected"], norms, change, experts.num_experts),
                    strict=True,
                ):
                    sums[name] = sums.get(name, 0) + value

            handles += [
                layer.post_attention_layernorm.register_forward_pre_hook(on_residual),
                layer.post_attention_layernorm.register_forward_hook(on_normed),
                router.register_forward_hook(on_router),
                experts.register_forward_hook(on_experts),
            ]
        elif hasattr(layer.mlp, "down_proj"):

            def on_down(module, args, index=index):
                sums = reference.setdefault(index, {})
                sums["total"] = sums.get("total", 0) + args[0].reshape(-1, args[0].shape[-1]).double().sum(0)

            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down))
    with torch.no_grad():
        for prompt in _prompts():
            full(torch.tensor([prompt]))
    for handle in handles:
        handle.remove()
    return reference


@pytest.mark.parametrize(
    "model_type",
    [
        *("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1"),
        *("exaone_moe", "deepseek_v2", "ernie4_5_moe", "hunyuan_v1_moe", "granitemoe", "granitemoeshared"),
        *("phimoe", "gpt_oss", "minimax_m2", "llama", "qwen3"),
        *("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "minimax"),  # hybrid: linear layers take their own mask
    ],
)
def test_layerwise_statistics_equal_full_model_hooks(tmp_path, model_type) -> None:
    """Batched, padded, one layer at a time == one prompt at a time through the whole model, for the routing
    sums and the expert-output sums (REAP, EAN, EASY-EP) alike."""
    config = {**moe_configs(), **dense_configs()}[model_type]
    directory = save_random_model(config, tmp_path / model_type)
    stats = collect_statistics(VariantBuilder(directory), _prompts(), batch_size=2)
    reference = _reference_statistics(directory, model_type)
    moe = {index for index, sums in reference.items() if "reap" in sums}
    assert (set(stats.router) if moe else set(stats.channels)) == (moe or set(reference)) and reference
    for index, expected in reference.items():
        if moe and index not in moe:
            assert index not in stats.channels, "a MoE model's dense layers are not scored"
        elif index in stats.router:
            got = stats.router[index]
            assert got.has_outputs
            for name in ("tcess", "reap", "ean"):
                torch.testing.assert_close(getattr(got, name).double(), expected[name].double(), rtol=1e-4, atol=1e-4)
            # EASY-EP's sums are small on tiny random models (1 - cos of nearly parallel states, ~1e-4): compared
            # relatively, or an atol of 1e-4 would hide a wrong residual stream altogether
            torch.testing.assert_close(got.easy_ep.double(), expected["easy_ep"].double(), rtol=2e-3, atol=1e-8)
            assert float(got.reap.sum()) > 0 and float(got.easy_ep.sum()) > 0
        else:
            torch.testing.assert_close(stats.channels[index].total, expected["total"], rtol=1e-4, atol=1e-4)
    assert stats.tokens == sum(len(p) for p in _prompts())


PEAK_SCRIPT = """
import json, sys, threading, time
import torch
from transformers import AutoModelForCausalLM
from server.model.calibrate import collect_statistics
from server.model.local_refinement import SearchOptions, refine_locally
from server.model.variant import VariantBuilder

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

directory, mode = sys.argv[1], sys.argv[2]
builder = VariantBuilder(directory) if mode != "full" else None
prompts = [[5 + (i * 7 + j) % 50 for j in range(24)] for i in range(8)]
if mode == "refine":  # the starting selections come from a statistics pass, outside the measurement
    stats = collect_statistics(builder, prompts, batch_size=8)
    starts = {m: {l: s.scores(m).topk(8).indices.tolist() for l, s in stats.router.items()} for m in ("tcess", "reap")}
base = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
if mode == "calibrate":
    collect_statistics(builder, prompts, batch_size=8)
elif mode == "refine":
    scores = {l: s.scores("reap") for l, s in stats.router.items()}
    result = refine_locally(builder, prompts, starts, scores, SearchOptions(candidates=4, max_swaps=2), batch_size=8)
    assert len(result) == 8 and all(len(r.kept) == 8 for r in result.values())
else:
    AutoModelForCausalLM.from_pretrained(directory)
done.set()
thread.join()
print(json.dumps({"added": peak[0] - base}))
"""


@pytest.mark.slow
def test_calibration_and_local_refinement_peak_memory_is_far_below_the_checkpoint(tmp_path) -> None:
    """Both layer-streamed passes (statistics, and the layer-local refinement with its cache of every expert's
    output on the tokens) hold one layer at a time, whatever the model's size."""
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    directory = save_random_model(config, tmp_path / "synthetic")
    checkpoint_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert checkpoint_bytes > 100e6

    def peak(mode: str) -> int:
        # A fixed mmap threshold makes glibc return freed layers to the OS at once: what is measured is
        # what the code holds, not what the allocator caches (its dynamic threshold would keep freed
        # layers in the heap).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(directory), mode],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["added"]

    full_load = peak("full")
    calibration = peak("calibrate")
    refinement = peak("refine")
    assert full_load > 0.9 * checkpoint_bytes, "the measurement must see a full load (else it proves nothing)"
    assert calibration < 0.3 * checkpoint_bytes, (calibration, checkpoint_bytes)
    assert refinement < 0.3 * checkpoint_bytes, (refinement, checkpoint_bytes)
