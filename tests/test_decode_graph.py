"""Static decode steps (the CUDA-graph path): the same tokens as the pool's dynamic path and as each pattern's
own variant, with routes switched by rewriting tensors. On the CPU the static step runs eagerly; the tests
marked `gpu` capture and replay it as a CUDA graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pattern_store.selection import Selection
from server.decoding_rows import left_padded
from server.model.decode_graph import StaticDecodeStep
from server.model.kv_cache import cache_argument
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_random_model

FAMILIES = ["qwen3_moe", "deepseek_v3", "minimax_m2"]  # softmax; sigmoid + groups + router bias; block bias


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-graph")
    configs = moe_configs()
    return {name: save_random_model(configs[name], root / name) for name in FAMILIES}


def _patterns(builder: VariantBuilder) -> list[dict[int, tuple[int, ...]]]:
    grouped = builder.family.balanced_groups(builder.config) > 1  # two groups of four: two kept in each
    shapes = [(0, 1, 4, 5), (2, 3, 6, 7), (1, 2, 5, 6)] if grouped else [(0, 1, 2), (3, 4, 5, 6), (2, 5, 7)]
    return [{layer: shape for layer in builder.sparse_layers} for shape in shapes]


def _greedy_alone(builder: VariantBuilder, kept: dict | None, prompt: list[int], steps: int) -> list[int]:
    """The reference: the pattern's own variant (or the full model), one sequence, a dynamic cache."""
    selection = None if kept is None else Selection("moe_experts", {k: list(v) for k, v in kept.items()})
    model = builder.build(selection)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        cache = out.past_key_values
        for _ in range(steps - 1):
            out = model(torch.tensor([[tokens[-1]]]), **cache_argument(model, cache))
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _greedy_static(step: StaticDecodeStep, prompts: list[list[int]], routes: list[RowRoute], steps: int) -> list:
    input_ids, mask = left_padded(prompts, pad=0, device=torch.device(step.pooled.device))
    logits = step.prefill(input_ids, mask, routes)
    tokens = [logits.argmax(dim=-1)]
    for _ in range(steps - 1):
        tokens.append(step.step(tokens[-1]).argmax(dim=-1))
    return torch.stack(tokens, dim=1).tolist()


def _run(checkpoint: Path, device: str, graph: bool) -> None:
    builder = VariantBuilder(checkpoint, device=device)
    pooled = PooledModel(builder, slots=8)
    for layer in pooled.layers:
        pooled.load(layer, list(range(8)), list(range(8)))
        for expert in range(8):
            pooled.place(layer, expert, expert)
    patterns = _patterns(builder)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18]]
    step = StaticDecodeStep(pooled, rows=4, max_length=24, graph=graph)
    for order in ([0, 1, 2, None], [2, None, 0, 1]):  # a task switch: other routes in the same rows
        kept = [None if i is None else patterns[i] for i in order]
        routes = [RowRoute("full") if k is None else RowRoute(f"p{i}", k) for i, k in zip(order, kept, strict=True)]
        got = _greedy_static(step, prompts, routes, steps=6)
        for row, prompt in enumerate(prompts):
            assert got[row] == _greedy_alone(builder, kept[row], prompt, steps=6), f"row {row} of {order}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_static_decode_steps_equal_each_rows_variant_and_routes_switch_by_tensors(checkpoints, model_type) -> None:
    _run(checkpoints[model_type], "cpu", graph=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_cuda_graph_decode_steps_equal_each_rows_variant(checkpoints, model_type) -> None:
    _run(checkpoints[model_type], "cuda", graph=True)
