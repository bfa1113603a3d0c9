"""Hybrid-attention MoE families (Qwen3-Next, Qwen3.5, MiniMax) decoded with a cache, alone and in a batch.

Their linear-attention layers keep a fixed-size state per sequence (Qwen3-Next's conv and recurrent states,
MiniMax's lightning key-value products) instead of keys and values. The reference for decoding with a cache
is the model run without one: the whole sequence through its forward at every step, greedy. The batched
decoder must give every row, joining mid-flight or leaving early, what it gets decoded alone.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from pattern_store.selection import Selection
from server.batching import BatchedDecoder, batchable
from server.cache import VariantKey
from server.engine import Generation, SamplingParams
from server.expert_pool import ExpertPool
from server.model.cache_rows import row_tensors
from server.model.calibrate import collect_statistics
from server.model.kv_cache import LightningCache, cache_argument, new_cache
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder

from tiny_models import hybrid_moe_configs, save_random_model

HYBRID = sorted(hybrid_moe_configs())
PROMPTS = [
    [3, 4, 5, 6, 7, 8, 9, 10, 11],
    [12, 13],
    [14, 15, 16, 17, 18, 19],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
]


class Tokens:
    """The tiny models have no tokenizer: a choice's text is its ids."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hybrid")
    return {name: save_random_model(config, root / name) for name, config in hybrid_moe_configs().items()}


def _variant(directory: Path):
    builder = VariantBuilder(directory)
    return builder.build(Selection("moe_experts", {layer: [1, 2, 4, 6, 7] for layer in builder.sparse_layers}))


def _greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _greedy(max_tokens: int = 10, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, n=n)


@pytest.mark.parametrize("model_type", HYBRID)
def test_generation_with_the_cache_equals_the_model_without_one(checkpoints, model_type) -> None:
    variant = _variant(checkpoints[model_type])
    for prompt in (PROMPTS[0], PROMPTS[1]):  # MiniMax: a prompt over several lightning blocks, one in one
        decoded = Generation(variant, Tokens(), prompt, _greedy()).run().choices[0].ids
        assert decoded == _greedy_without_cache(variant, prompt, 10)


@pytest.mark.parametrize("model_type", HYBRID)
def test_the_cpu_kernels_are_deterministic(checkpoints, model_type) -> None:
    variant = _variant(checkpoints[model_type])
    x = torch.tensor([PROMPTS[0], PROMPTS[3][:9]])
    with torch.no_grad():
        assert torch.equal(variant(x).logits, variant(x).logits)


def test_a_minimax_step_without_positions_sees_the_whole_prefix(checkpoints) -> None:
    """MiniMax-Text-01 begins with lightning layers. transformers' own `MiniMaxCache` then reads its length off
    layer 0 (0 tokens), so a step without explicit positions is placed at position 0; `LightningCache` reads it
    off the first softmax-attention layer, and the step's logits are the model's without a cache."""
    variant = _variant(checkpoints["minimax"])
    prompt, token = PROMPTS[0], 40
    with torch.no_grad():
        reference = variant(torch.tensor([[*prompt, token]]), use_cache=False).logits[0, -1]
        logits = {}
        for cache in (LightningCache(variant.config), MiniMaxCache()):
            variant(torch.tensor([prompt]), **cache_argument(variant, cache), use_cache=True)
            step = variant(torch.tensor([[token]]), **cache_argument(variant, cache), use_cache=True)
            logits[type(cache)] = (cache.get_seq_length(), step.logits[0, -1])
    assert logits[LightningCache][0] == len(prompt) + 1
    torch.testing.assert_close(logits[LightningCache][1], reference, rtol=1e-5, atol=1e-5)
    assert logits[MiniMaxCache][0] == 0, "transformers' MiniMaxCache no longer loses the length: drop LightningCache"
    assert not torch.allclose(logits[MiniMaxCache][1], reference, atol=1e-4)


@pytest.mark.parametrize("model_type", HYBRID)
def test_the_cache_holds_a_state_per_row_in_linear_layers(checkpoints, model_type) -> None:
    variant = _variant(checkpoints[model_type])
    cache = new_cache(variant.config)
    with torch.no_grad():
        variant(torch.tensor([PROMPTS[0], PROMPTS[0]]), **cache_argument(variant, cache), use_cache=True)
    tensors = row_tensors(cache)
    linear = variant.config.layer_types.count("linear_attention")
    full = variant.config.layer_types.count("full_attention")
    assert sum(t.sequence for t in tensors) == 2 * full  # keys and values
    assert len(tensors) - 2 * full == linear * (1 if model_type == "minimax" else 2)  # (conv and) recurrent
    assert all(t.tensor.shape[0] == 2 for t in tensors)
    assert all(t.tensor.shape[-2] == len(PROMPTS[0]) for t in tensors if t.sequence)


def _run_staggered(decoder: BatchedDecoder, generations: list[Generation], routes=None) -> list[int]:
    """Each generation on its own thread, 10 ms apart; the batch sizes of the forward passes. The first one
    holds the decoding thread at its first token until every other has been handed to the decoder, so that
    they join a batch already decoding however slow the machine is."""
    sizes: list[int] = []
    handle = decoder.model.register_forward_hook(
        lambda module, args, kwargs, output: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    handed = threading.Event()
    routes = routes or [None] * len(generations)
    emits = [lambda delta: handed.wait(10)] + [None] * (len(generations) - 1)
    threads = [
        threading.Thread(target=decoder.run, args=arguments)
        for arguments in zip(generations, emits, routes, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.01)
        time.sleep(0.05)  # the last thread's request reaches the decoder's queue
        handed.set()
        for thread in threads:
            thread.join(60)
    finally:
        handle.remove()
    assert not any(thread.is_alive() for thread in threads), "a request did not finish"
    return sizes


@pytest.mark.parametrize("model_type", HYBRID)
@pytest.mark.parametrize("chunk", [None, 4], ids=["whole-prompts", "chunked-prefill"])
def test_rows_joining_mid_flight_get_their_one_by_one_answers(checkpoints, model_type, chunk) -> None:
    """Prompts of different lengths (left padding), two choices for one of them (its rows repeated), answers
    of different lengths (rows leave while others decode), later requests joining a batch already decoding."""
    variant = _variant(checkpoints[model_type])
    assert batchable(variant)
    params = [_greedy(12), _greedy(5), _greedy(9, n=2), _greedy(12)]  # two choices of a prompt prefilled in chunks
    alone = [Generation(variant, Tokens(), p, q).run() for p, q in zip(PROMPTS, params, strict=True)]
    together = [Generation(variant, Tokens(), p, q) for p, q in zip(PROMPTS, params, strict=True)]
    sizes = _run_staggered(BatchedDecoder(variant, max_batch=8, max_prefill_tokens=chunk), together)
    for got, expected in zip(together, alone, strict=True):
        assert [c.ids for c in got.choices] == [c.ids for c in expected.choices]
        assert all(len(c.ids) == got.params.max_tokens for c in got.choices)  # no EOS: every step compared
    assert max(sizes) > 2, "no forward pass decoded several rows"


@pytest.mark.parametrize("model_type", HYBRID)
def test_one_pooled_loop_serves_hybrid_rows_of_different_patterns(checkpoints, model_type) -> None:
    builder = VariantBuilder(checkpoints[model_type])
    pool = ExpertPool(PooledModel(builder, slots=8))
    layers = sorted(builder.sparse_layers)
    shapes = [(0, 1, 2), (2, 3, 4, 5), (5, 6, 7)]
    patterns = {name: dict.fromkeys(layers, kept) for name, kept in zip("abc", shapes, strict=True)}
    leases = {name: pool.acquire(VariantKey(name), RowRoute(name, kept)) for name, kept in patterns.items()}
    generations = [Generation(leases[name].model, Tokens(), PROMPTS[i], _greedy(8)) for i, name in enumerate("abc")]
    decoder = BatchedDecoder(pool.pooled.model, max_batch=8, pooled=pool.pooled)
    _run_staggered(decoder, generations, [leases[name].route for name in "abc"])
    for i, (name, kept) in enumerate(patterns.items()):
        variant = builder.build(Selection("moe_experts", {layer: list(k) for layer, k in kept.items()}))
        assert generations[i].choices[0].ids == _greedy_without_cache(variant, PROMPTS[i], 8), name
        pool.release(leases[name])


LIGHTNING_DECAYS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def test_a_minimax_checkpoint_without_its_lightning_decays_is_served_and_calibrated(checkpoints, tmp_path) -> None:
    """The decays of lightning attention are buffers that MiniMax's init computes from the config; a
    checkpoint may leave them out. The variant and the layer-streamed calibration compute them as
    transformers' loader does, and equal the checkpoint that holds them; variants share them, as they share
    the backbone."""
    source = checkpoints["minimax"]
    stripped = tmp_path / "minimax"
    shutil.copytree(source, stripped)
    tensors = load_file(stripped / "model.safetensors")
    assert any(name.endswith(LIGHTNING_DECAYS) for name in tensors)
    kept = {name: tensor for name, tensor in tensors.items() if not name.endswith(LIGHTNING_DECAYS)}
    save_file(kept, stripped / "model.safetensors", metadata={"format": "pt"})
    x = torch.tensor([PROMPTS[0], PROMPTS[3][:9]])
    builder = VariantBuilder(stripped)
    first, second = builder.build(), builder.build(Selection("moe_experts", {0: [1, 2, 3]}))
    with torch.no_grad():
        torch.testing.assert_close(first(x).logits, _variant_logits(source, x), rtol=0, atol=0)
    decays = [name for name, _ in first.named_buffers() if name.endswith(LIGHTNING_DECAYS)]
    assert decays and all(first.get_buffer(n).data_ptr() == second.get_buffer(n).data_ptr() for n in decays)
    prompts = [PROMPTS[0], PROMPTS[2]]
    got, expected = (collect_statistics(VariantBuilder(d), prompts, batch_size=2) for d in (stripped, source))
    for layer, sums in expected.router.items():
        torch.testing.assert_close(got.router[layer].reap, sums.reap, rtol=0, atol=0)


def _variant_logits(directory: Path, x: torch.Tensor) -> torch.Tensor:
    return VariantBuilder(directory).build()(x).logits


def test_a_multimodal_release_is_served_in_its_own_dtype(tmp_path) -> None:
    """Qwen3.5's release config names its dtype at the top; its text config, which the server builds, does not."""
    import json

    directory = save_random_model(hybrid_moe_configs()["qwen3_5_moe"], tmp_path / "qwen3_5")
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config))
    assert VariantBuilder(directory).dtype == torch.bfloat16
