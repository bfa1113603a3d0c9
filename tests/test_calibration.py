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

from pattern_store.tcess import tcess_sums
from server.model.calibrate import collect_statistics
from server.model.variant import VariantBuilder

from tiny_models import dense_configs, moe_configs, save_random_model

ROOT = Path(__file__).resolve().parents[1]


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7)]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "llama", "qwen3"])
def test_layerwise_statistics_equal_full_model_hooks(tmp_path, model_type) -> None:
    """Batched, padded, one layer at a time == one prompt at a time through the whole model."""
    config = {**moe_configs(), **dense_configs()}[model_type]
    directory = save_random_model(config, tmp_path / model_type)
    stats = collect_statistics(VariantBuilder(directory), _prompts(), batch_size=2)
    full = AutoModelForCausalLM.from_pretrained(directory).eval()
    reference: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(full.model.layers):
        if index in stats.router:

            def on_router(module, args, output, index=index):
                logits, _, selected = output
                gates = torch.sigmoid(logits.float()) if model_type == "deepseek_v3" else torch.softmax(logits, -1)
                reference[index] = reference.get(index, 0) + tcess_sums(gates, selected.reshape(-1, selected.shape[-1]))

            handles.append(layer.mlp.gate.register_forward_hook(on_router))
        elif index in stats.channels:

            def on_down(module, args, index=index):
                reference[index] = reference.get(index, 0) + args[0].reshape(-1, args[0].shape[-1]).double().sum(0)

            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down))
    with torch.no_grad():
        for prompt in _prompts():
            full(torch.tensor([prompt]))
    assert set(reference) == set(stats.router) | set(stats.channels) and reference
    for index, expected in reference.items():
        got = stats.router[index].tcess if index in stats.router else stats.channels[index].total
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-4)
    assert stats.tokens == sum(len(p) for p in _prompts())


PEAK_SCRIPT = """
import json, sys, threading, time
import torch
from transformers import AutoModelForCausalLM
from server.model.calibrate import collect_statistics
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
builder = VariantBuilder(directory) if mode == "calibrate" else None
prompts = [[5 + (i * 7 + j) % 50 for j in range(24)] for i in range(8)]
base = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
if mode == "calibrate":
    collect_statistics(builder, prompts, batch_size=8)
else:
    AutoModelForCausalLM.from_pretrained(directory)
done.set()
thread.join()
print(json.dumps({"added": peak[0] - base}))
"""


@pytest.mark.slow
def test_calibration_peak_memory_is_far_below_the_checkpoint(tmp_path) -> None:
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
    assert full_load > 0.9 * checkpoint_bytes, "the measurement must see a full load (else it proves nothing)"
    assert calibration < 0.3 * checkpoint_bytes, (calibration, checkpoint_bytes)
