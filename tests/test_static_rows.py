"""A decoding batch in a static cache (`static_rows`, the CUDA-graph path of `BatchedDecoder`): rows join while
others decode, leave from the middle, and get moved when the cache fills, and every row still decodes what
its pattern's own variant decodes alone. On the CPU the steps run eagerly; the tests marked `gpu` replay them
as CUDA graphs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pattern_store.selection import Selection
from server.batching import BatchedDecoder
from server.decoding_rows import left_padded
from server.engine import Generation, SamplingParams
from server.model.kv_cache import cache_argument, new_cache
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder
from server.static_rows import StaticRows, sizes, static_decodable

from tiny_models import moe_configs, save_random_model

FAMILIES = ["qwen3_moe", "deepseek_v3", "minimax_m2"]  # softmax; sigmoid + groups + MLA keys; block bias


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-static")
    configs = moe_configs()
    return {name: save_random_model(configs[name], root / name) for name in [*FAMILIES, "qwen3_next"]}


def _pooled(checkpoint: Path, device: str = "cpu") -> tuple[VariantBuilder, PooledModel, list[RowRoute]]:
    builder = VariantBuilder(checkpoint, device=device)
    pooled = PooledModel(builder, slots=8)
    for layer in pooled.layers:
        pooled.load(layer, list(range(8)), list(range(8)))
        for expert in range(8):
            pooled.place(layer, expert, expert)
    grouped = builder.family.balanced_groups(builder.config) > 1
    shapes = [(0, 1, 4, 5), (2, 3, 6, 7), (1, 2, 5, 6)] if grouped else [(0, 1, 2), (3, 4, 5, 6), (2, 5, 7)]
    routes = [RowRoute(f"p{i}", {layer: shape for layer in builder.sparse_layers}) for i, shape in enumerate(shapes)]
    return builder, pooled, [*routes, RowRoute("full")]


def _alone(builder: VariantBuilder, route: RowRoute, prompt: list[int], steps: int) -> list[int]:
    """The reference: the route's own variant (or the full model), one sequence, a dynamic cache, greedy."""
    kept = {layer: list(experts) for layer, experts in route.kept.items()}
    model = builder.build(Selection("moe_experts", kept) if kept else None)
    with torch.no_grad():
        out = model(torch.tensor([prompt], device=builder.device), use_cache=True)
        tokens, cache = [int(out.logits[0, -1].argmax())], out.past_key_values
        for _ in range(steps - 1):
            out = model(torch.tensor([[tokens[-1]]], device=builder.device), **cache_argument(model, cache))
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _prefill(pooled: PooledModel, prompts: list[list[int]], routes: list[RowRoute]) -> tuple:
    """A left-padded prefill with a dynamic cache, as `BatchedDecoder` makes one: cache, mask, first tokens."""
    input_ids, mask = left_padded(prompts, pad=0, device=pooled.device)
    cache = new_cache(pooled.model.config)
    with torch.no_grad(), pooled.rows(routes):
        out = pooled.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **cache_argument(pooled.model, cache),
        )
    return cache, mask, out.logits[:, -1].argmax(-1)


def _scripted(checkpoint: Path, device: str, graphs: bool) -> StaticRows:
    """Rows join at different columns (one longer than the batch so far: the rows move right), the first
    row leaves while the others go on (they move up), and the cache fills (the rows move left)."""
    builder, pooled, routes = _pooled(checkpoint, device)
    batch = StaticRows(pooled, capacity=4, max_length=20, graphs=graphs)
    prompts = {"a": [5, 6, 7, 8, 9], "b": [10, 11, 12, 13, 14, 15, 16, 17, 18, 19], "c": [20, 21], "d": [22, 23, 24]}
    route_of = {"a": routes[0], "b": routes[1], "c": routes[3], "d": routes[2]}
    got: dict[str, list[int]] = {}

    def join(names: list[str]) -> None:
        cache, mask, first = _prefill(pooled, [prompts[n] for n in names], [route_of[n] for n in names])
        for name, token in zip(names, first.tolist(), strict=True):
            got[name] = [token]
        index = torch.arange(len(names), device=pooled.device)
        batch.join(names, [route_of[n] for n in names], cache, mask, index, mask.sum(-1), first)

    def step(times: int) -> None:
        for _ in range(times):
            logits = batch.step()
            tokens = logits.argmax(-1).tolist()
            for name, token in zip(batch.requests, tokens, strict=True):
                got[name].append(token)
            batch.advance(list(range(batch.rows)), tokens, batch.requests)

    join(["a"])
    step(3)  # column 8
    join(["b", "c"])  # b's 10 columns do not fit left of column 8: every row moves right
    assert batch.column == 10
    step(2)
    keep = [1, 2]  # a leaves
    batch.advance(keep, [got["b"][-1], got["c"][-1]], ["b", "c"])
    join(["d"])
    assert batch.rows == 3 and batch.requests == ["b", "c", "d"]
    step(3)  # column 15
    batch.advance([1, 2], [got["c"][-1], got["d"][-1]], ["c", "d"])  # b leaves: 8 columns are padding for all
    step(1)
    assert batch.column == 8 and batch.starts == [0, 1]  # the rows moved left before the step
    step(6)  # column 14
    batch.advance([1], [got["d"][-1]], ["d"])  # c leaves: d starts at column 1
    step(6)
    assert batch.column == 20 and batch.starts == [1]  # the cache is full
    step(1)  # so d moves left by its one column of padding before the step
    assert batch.column == 20 and batch.starts == [0]
    for name, tokens in got.items():
        assert tokens == _alone(builder, route_of[name], prompts[name], len(tokens)), name
    return batch


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rows_joining_leaving_and_moving_decode_as_their_variants(checkpoints, model_type) -> None:
    _scripted(checkpoints[model_type], "cpu", graphs=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_rows_decode_as_their_variants_through_cuda_graphs(checkpoints, model_type) -> None:
    batch = _scripted(checkpoints[model_type], "cuda", graphs=True)
    report = batch.report()
    assert report["graph_error"] is None and report["graphs"], report  # the steps were replayed graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="capture works here")
def test_steps_that_cannot_be_captured_run_eagerly_and_the_report_says_why(checkpoints) -> None:
    """Graphs asked for where capture fails (here: no CUDA): one warning, the same tokens, the reason shown."""
    batch = _scripted(checkpoints["qwen3_moe"], "cpu", graphs=True)
    report = batch.report()
    assert not batch.graphs and report["graphs"] == [] and report["graph_error"].startswith("RuntimeError")


class _Tokens:  # the tiny models have no tokenizer: text is the ids
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_the_decoder_serves_fitting_requests_from_the_static_cache_and_the_rest_beside_them(
    checkpoints, model_type
) -> None:
    _decoder_run(checkpoints[model_type], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_decoder_replays_cuda_graphs_for_concurrent_requests(checkpoints) -> None:
    decoder = _decoder_run(checkpoints["qwen3_moe"], "cuda")
    report = decoder.static.report()
    assert report["graph_error"] is None and report["graphs"], report


def _decoder_run(checkpoint: Path, device: str) -> BatchedDecoder:
    """Concurrent requests of three patterns and the full model, with two choices for one and one that does
    not fit the static cache: each gets its variant's greedy answer, and the static steps did run."""
    builder, pooled, routes = _pooled(checkpoint, device)
    decoder = BatchedDecoder(pooled.model, max_batch=8, pooled=pooled, static_length=24)
    static_steps = []
    step = decoder._static.step
    decoder._static.step = lambda: static_steps.append(decoder._static.rows) or step()
    work = [  # (route, prompt, max_tokens, n)
        (routes[0], [3, 4, 5, 6], 8, 1),
        (routes[1], [7, 8], 12, 2),
        (routes[2], [9, 10, 11, 12, 13], 6, 1),
        (routes[3], [14, 15, 16], 30, 1),  # 33 columns: the growing cache
        (routes[0], [17, 18, 19, 20, 21, 22, 23], 10, 1),
    ]
    results: dict[int, list[list[int]]] = {}

    def run(i: int, delay: float) -> None:
        route, prompt, max_tokens, n = work[i]
        threading.Event().wait(delay)
        params = SamplingParams(max_tokens, temperature=0.0, n=n, ignore_eos=True)
        generation = Generation(pooled.routed(route), _Tokens(), prompt, params)
        decoder.run(generation, route=route)
        results[i] = [choice.ids for choice in generation.choices]

    threads = [threading.Thread(target=run, args=(i, 0.05 * i)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert static_steps and max(static_steps) >= 2  # rows of several requests decoded in the static cache
    for i, (route, prompt, max_tokens, n) in enumerate(work):
        alone = _alone(builder, route, prompt, max_tokens)
        assert results[i] == [alone] * n, i
    return decoder


def test_step_sizes_and_which_models_decode_in_a_static_cache(checkpoints) -> None:
    assert sizes(32) == [1, 2, 4, 8, 16, 32] and sizes(24) == [1, 2, 4, 8, 16, 24]
    assert sizes(4096, 128) == [128, 256, 512, 1024, 2048, 4096] and sizes(64, 128) == [64]
    assert static_decodable(VariantBuilder(checkpoints["qwen3_moe"]).build(None))
    assert not static_decodable(VariantBuilder(checkpoints["qwen3_next"]).build(None))  # linear attention


def test_a_request_longer_than_the_cache_is_refused_by_the_rows_and_kept_out_by_the_decoder(checkpoints) -> None:
    _, pooled, _ = _pooled(checkpoints["qwen3_moe"])
    batch = StaticRows(pooled, capacity=2, max_length=16, graphs=False)
    assert batch.fits(10, 6) and not batch.fits(10, 7)
    with pytest.raises(ValueError, match="2 columns"):
        StaticRows(pooled, capacity=2, max_length=1)
