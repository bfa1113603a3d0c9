"""Coverage: the share of the full router's top-k gate mass on a pattern's kept experts, recorded at
calibration and sampled live by the expert pool (`pattern_store.coverage`, `server.model.coverage_meter`).

The reference is Qwen3-MoE's routing written out here (softmax over the router's logits, top-k), applied
to the hidden states each router received, read by forward pre-hooks on the transformers modules."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from demo.tasks import get_task
from pattern_store.coverage import calibrated_coverage, gate_mass_sums, reference_coverage, token_coverage
from pattern_store.selection import Selection
from server.batching import BatchedDecoder
from server.cli import main
from server.config import ServerConfig
from server.engine import Generation, SamplingParams
from server.model.calibrate import collect_statistics
from server.model.coverage_meter import CoverageMeter, CoverageSample
from server.model.novices import NoviceTable
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder
from server.patterns import pattern_coverage
from server.static_rows import StaticRows

from conftest import DEMO_MOE
from server_harness import copy_demo_store, running_server
from tiny_models import moe_configs, save_random_model

KEPT = {"a": (0, 1, 2), "b": (3, 4, 5, 6)}


class _Ids:  # the tiny models have no tokenizer: text is the ids
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_random_model(moe_configs()["qwen3_moe"], tmp_path_factory.mktemp("tiny-coverage") / "qwen3_moe")


def _reference(hidden: torch.Tensor, weight: torch.Tensor, k: int, kept: tuple[int, ...]) -> torch.Tensor:
    """Per token: the full router's top-k probability mass on `kept`, over all its top-k mass."""
    probs = torch.softmax(hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().T, dim=-1)
    top, index = probs.topk(k, dim=-1)
    keep = torch.tensor([[expert in kept for expert in row] for row in index.tolist()], dtype=torch.float64)
    return (top * keep).sum(-1) / top.sum(-1)


def _full_router_inputs(
    builder: VariantBuilder, prompts: list[list[int]], layers: list[int]
) -> tuple[torch.nn.Module, dict[int, list[torch.Tensor]]]:
    """The full model, and what each sparse layer's router received for each prompt run alone."""
    model = builder.build()
    captured, handles = _router_inputs(model, layers)
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return model, captured


def _router_inputs(model: torch.nn.Module, layers: list[int]) -> tuple[dict[int, list[torch.Tensor]], list]:
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [
        model.model.layers[layer].mlp.gate.register_forward_pre_hook(
            lambda module, args, layer=layer: captured[layer].append(args[0].detach().clone())
        )
        for layer in layers
    ]
    return captured, handles


def test_token_coverage_and_the_calibration_sums_follow_the_definition() -> None:
    generator = torch.Generator().manual_seed(3)
    weights = torch.rand(50, 4, generator=generator)
    experts = torch.stack([torch.randperm(10, generator=generator)[:4] for _ in range(50)])
    kept = [0, 2, 3, 7, 9]
    pruned = torch.ones(50, 10, dtype=torch.bool)
    pruned[:, kept] = False
    mass, top1 = token_coverage(weights, experts, pruned)
    for t in range(50):  # the definition, token by token
        chosen = [(float(w), int(e)) for w, e in zip(weights[t], experts[t], strict=True)]
        assert float(mass[t]) == pytest.approx(sum(w for w, e in chosen if e in kept) / sum(w for w, _ in chosen))
        assert float(top1[t]) == float(max(chosen)[1] in kept)
    sums = gate_mass_sums(weights, experts, 10)
    recorded = calibrated_coverage({5: sums[0]}, {5: sums[1]}, 50, {5: kept})
    assert recorded["mass"] == pytest.approx(float(mass.mean()), abs=1e-6)
    assert recorded["top1"] == pytest.approx(float(top1.mean()), abs=1e-6)
    assert calibrated_coverage({5: sums[0]}, {5: sums[1]}, 50, {})["mass"] == pytest.approx(1.0)  # keeps all


def test_calibration_records_the_full_routers_coverage_of_the_kept_experts(checkpoint) -> None:
    builder = VariantBuilder(checkpoint)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    stats = collect_statistics(builder, prompts, batch_size=2)
    layers = sorted(builder.sparse_layers)
    recorded = pattern_coverage(stats, Selection("moe_experts", {layer: list(KEPT["a"]) for layer in layers}))
    model, captured = _full_router_inputs(builder, prompts, layers)
    k = builder.config.num_experts_per_tok
    for layer in layers:
        weight = model.model.layers[layer].mlp.gate.weight
        expected = torch.cat([_reference(h, weight, k, KEPT["a"]) for h in captured[layer]]).mean()
        assert recorded["layers"][str(layer)]["mass"] == pytest.approx(float(expected), abs=1e-5)
    assert recorded["tokens"] == 14 and 0 < recorded["mass"] < 1
    assert "answers" not in recorded  # not told where answers begin: no answers' figure


def test_calibration_records_the_answers_coverage_on_the_answers_tokens_only(checkpoint) -> None:
    """With answer starts, the answers' figure is the reference over the tokens from each start on (a prompt
    whose start is its length has no answer); the overall figure still covers every token."""
    builder = VariantBuilder(checkpoint)
    prompts, starts = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], [4, 3, 1]
    stats = collect_statistics(builder, prompts, batch_size=2, answer_starts=starts)
    layers = sorted(builder.sparse_layers)
    recorded = pattern_coverage(stats, Selection("moe_experts", {layer: list(KEPT["b"]) for layer in layers}))
    model, captured = _full_router_inputs(builder, prompts, layers)
    k = builder.config.num_experts_per_tok
    answers = recorded["answers"]
    assert answers["tokens"] == 2 + 0 + 4 and recorded["tokens"] == 14
    for layer in layers:
        weight = model.model.layers[layer].mlp.gate.weight
        per_prompt = [_reference(h, weight, k, KEPT["b"]) for h in captured[layer]]
        expected = torch.cat([values[start:] for values, start in zip(per_prompt, starts, strict=True)]).mean()
        assert answers["layers"][str(layer)]["mass"] == pytest.approx(float(expected), abs=1e-5)
        assert recorded["layers"][str(layer)]["mass"] == pytest.approx(float(torch.cat(per_prompt).mean()), abs=1e-5)
    assert reference_coverage(recorded) == answers["mass"] != recorded["mass"]
    assert reference_coverage({"mass": 0.7}) == 0.7 and reference_coverage(None) is None


def test_watched_requests_report_the_probability_their_variant_gave_each_generated_token(checkpoint) -> None:
    """At rate 1 every pattern request is watched: per pattern, the meter's confidence is the mean over its
    requests of each one's mean token probability, which a reference computes by running the pattern's own
    variant over the prompt and the generated tokens (teacher-forced); the full model's requests are not
    watched, and a cancelled request is not counted."""
    builder, pooled = _pool(checkpoint)
    pooled.coverage = CoverageMeter(rate=1.0, tolerance=0.1)
    layers = sorted(builder.sparse_layers)
    routes = {name: RowRoute(name, {layer: KEPT[name] for layer in layers}, "r1", 0.9) for name in KEPT}
    routes["full"] = RowRoute("full")
    decoder = BatchedDecoder(pooled.model, max_batch=4, pooled=pooled)
    work = [("a", [3, 4, 5, 6], 6), ("b", [7, 8, 9], 5), ("a", [10, 11], 7), ("full", [12, 13, 14], 4)]
    answers: list[list[int]] = [[] for _ in work]

    def run(i: int) -> None:
        name, prompt, max_tokens = work[i]
        params = SamplingParams(max_tokens, temperature=0.0, ignore_eos=True)
        generation = Generation(pooled.routed(routes[name]), _Ids(), prompt, params)
        decoder.run(generation, route=routes[name])
        answers[i] = generation.choices[0].ids

    with ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(run, range(len(work))))
    expected: dict[str, list[float]] = {}
    for (name, prompt, _), answer in zip(work, answers, strict=True):
        if name == "full":
            continue
        variant = builder.build(Selection("moe_experts", {layer: list(KEPT[name]) for layer in layers}))
        with torch.no_grad():
            logits = variant(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        chosen = torch.softmax(logits.double(), -1).gather(1, torch.tensor(answer)[:, None])
        expected.setdefault(name, []).append(float(chosen.mean()))
    for name, means in expected.items():
        report = pooled.coverage.report(name)
        assert report["confidence_requests"] == len(means)
        assert report["confidence"] == pytest.approx(sum(means) / len(means), abs=1e-4), name
        assert report["recent_confidence"] == pytest.approx(report["confidence"])
    assert pooled.coverage.report("full") is None
    heard = CoverageMeter(rate=1.0, tolerance=0.1)  # a pattern heard of through a watched request only
    watched = heard.watch(routes["a"])
    watched.add(torch.tensor([[0.0, 0.0]]), [1])
    heard.finish_watch(routes["a"], watched)
    assert heard.report("a")["mass"] is None and heard.report("a")["confidence"] == pytest.approx(0.5)


def _pool(checkpoint: Path) -> tuple[VariantBuilder, PooledModel]:
    builder = VariantBuilder(checkpoint)
    pooled = PooledModel(builder, slots=8)
    for layer in pooled.layers:
        pooled.load(layer, list(range(8)), list(range(8)))
        for expert in range(8):
            pooled.place(layer, expert, expert)
    return builder, pooled


@pytest.mark.parametrize(
    "rows", [["a", "b", "a"], ["a", "a"], ["novices", "b"], ["novices"]],
    ids=["mixed", "one pattern", "novices mixed", "novices alone"],
)  # fmt: skip
def test_live_coverage_is_the_full_routers_mass_on_the_served_hidden_states(checkpoint, rows) -> None:
    """At rate 1 every pass is sampled; per layer, the meter's figure for a pattern equals the reference over
    its rows' tokens, on the hidden states the pooled (pruned) rows really had. A pattern with novices routes
    unmasked, and its coverage is still the full router's mass on the experts it keeps."""
    builder, pooled = _pool(checkpoint)
    pooled.coverage = CoverageMeter(rate=1.0, tolerance=0.1)
    layers = sorted(builder.sparse_layers)
    routes = {name: RowRoute(name, {layer: KEPT[name] for layer in layers}, "r1", 0.9) for name in KEPT}
    hidden_size = int(builder.config.hidden_size)
    pruned = 8 - len(KEPT["a"])
    tables = {
        layer: NoviceTable.of_pruned(
            torch.randn(pruned, hidden_size, generator=torch.Generator().manual_seed(layer)), KEPT["a"], 8
        )
        for layer in layers
    }
    routes["novices"] = RowRoute("novices", routes["a"].kept, "r1", 0.9, tables)
    kept_sets = {**KEPT, "novices": KEPT["a"]}
    captured, handles = _router_inputs(pooled.model, layers)
    ids = torch.randint(3, 64, (len(rows), 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pooled.rows([routes[name] for name in rows]):
        pooled.model(input_ids=ids)
    for handle in handles:
        handle.remove()
    k = builder.config.num_experts_per_tok
    for name in sorted(set(rows)):
        report = pooled.coverage.report(name)
        assert report["samples"] == rows.count(name) and report["tokens"] == 5 * rows.count(name)
        for layer in layers:
            weight = pooled.model.model.layers[layer].mlp.gate.weight
            hidden = captured[layer][0].reshape(len(rows), 5, -1)
            mine = [row for row, route in enumerate(rows) if route == name]
            expected = torch.cat([_reference(hidden[row], weight, k, kept_sets[name]) for row in mine]).mean()
            assert report["layers"][str(layer)]["mass"] == pytest.approx(float(expected), abs=1e-5), (name, layer)


def test_padding_rows_and_padded_tokens_are_not_counted(checkpoint) -> None:
    builder, pooled = _pool(checkpoint)
    pooled.coverage = CoverageMeter(rate=1.0, tolerance=0.1)
    layers = sorted(builder.sparse_layers)
    route = RowRoute("a", {layer: KEPT["a"] for layer in layers}, "r1", 0.9)
    ids = torch.randint(3, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad(), pooled.rows([route, route], attention_mask=mask):
        pooled.model(input_ids=ids, attention_mask=mask)
    assert pooled.coverage.report("a")["tokens"] == 6
    # the static batch: 3 active rows run in the 4-row step; the fourth is padding
    batch = StaticRows(pooled, capacity=4, max_length=16, graphs=False)
    from server.model.kv_cache import cache_argument, new_cache

    cache, prompts = new_cache(pooled.model.config), torch.randint(3, 64, (3, 4))
    with torch.no_grad(), pooled.rows([route] * 3):
        out = pooled.model(input_ids=prompts, use_cache=True, **cache_argument(pooled.model, cache))
    first = out.logits[:, -1].argmax(-1)
    before = pooled.coverage.report("a")["samples"]
    ones = torch.ones_like(prompts)
    batch.join([0, 1, 2], [route] * 3, cache, ones, torch.arange(3), ones.sum(-1), first)
    batch.step()
    assert pooled.coverage.report("a")["samples"] == before + 3


def test_a_pattern_is_flagged_when_its_recent_coverage_falls_below_its_calibration() -> None:
    meter = CoverageMeter(rate=1.0, tolerance=0.1, min_samples=10)
    route = RowRoute("sort", {0: (0, 1)}, "r1", calibrated=0.8)

    def feed(mass: float, times: int, which: RowRoute = route) -> None:
        for _ in range(times):
            sample = CoverageSample([which], None)
            pruned = torch.tensor([[False, False, True, True]])
            weights = torch.tensor([[mass, 1 - mass]]).clamp_min(1e-6)
            sample.add(0, weights, torch.tensor([[0, 2]]), pruned)  # expert 0 kept, expert 2 pruned
            meter.finish(sample)

    feed(0.78, 30)
    assert meter.flagged() == [] and meter.report("sort")["recent_mass"] == pytest.approx(0.78)
    prompt = CoverageSample([route], None)  # a prefill pass of 3 tokens counts, but not towards the flag
    prompt.add(
        0, torch.tensor([[0.1, 0.9]] * 3), torch.tensor([[0, 2]] * 3), torch.tensor([[False, False, True, True]] * 3)
    )
    meter.finish(prompt)
    report = meter.report("sort")
    assert report["tokens"] == 33 and report["recent_mass"] == pytest.approx(0.78)
    assert report["mass"] == pytest.approx((30 * 0.78 + 3 * 0.1) / 33)
    feed(0.5, 9)
    assert meter.flagged() == []  # the window's mean is still within the tolerance
    feed(0.5, 200)
    assert meter.flagged() == ["sort"]
    feed(0.8, 200)
    assert meter.flagged() == []  # back to its task
    feed(0.2, 5, RowRoute("sort", {0: (0, 1)}, "r2", calibrated=0.8))  # a new revision starts again
    assert meter.report("sort")["samples"] == 5 and meter.flagged() == []
    with pytest.raises(ValueError, match="rate"):
        CoverageMeter(rate=0.0, tolerance=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("rate", [1.0, 0.0], ids=["sampled", "off"])
def test_the_server_reports_each_patterns_live_and_calibrated_coverage(tmp_path, rate, capsys) -> None:
    """`/metrics`, `GET /admin/patterns/NAME` and `taskmoe patterns show --server` show the live coverage
    beside the calibrated one; off, the live figure is absent and no coverage metric is exported."""
    store = copy_demo_store(tmp_path)
    config = ServerConfig(model=DEMO_MOE, store=store, coverage_rate=rate, admin_key="k")
    with running_server(config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [example.prompt for example in get_task("sort").examples(4, 5)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: client.chat.completions.create(
                model="demo-moe@sort", messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0
            ), prompts))  # fmt: skip
        shown = httpx.get(f"{server.url}/admin/patterns/sort", headers={"Authorization": "Bearer k"}).json()
        calibrated = shown["coverage"]["calibrated"]
        assert 0 < calibrated["mass"] < 1 and set(calibrated["layers"]) == {"0", "1", "2", "3"}
        live = shown["coverage"]["live"]
        if rate == 0:
            assert live is None and "taskmoe_pattern_coverage{" not in httpx.get(f"{server.url}/metrics").text
            return
        assert live["samples"] >= 4 and live["tokens"] > 4 * 8 and 0 < live["mass"] <= 1
        reference = calibrated["answers"]["mass"]  # the demo's patterns record their answers' coverage
        assert live["calibrated"] == reference and live["flagged"] is False
        assert server.metric("taskmoe_pattern_coverage", 'pattern="sort"') == pytest.approx(live["recent_mass"])
        assert server.metric("taskmoe_pattern_coverage_samples", 'pattern="sort"') == live["samples"]
        assert server.metric("taskmoe_pattern_coverage_calibrated", 'pattern="sort"') == reference
        assert live["confidence_requests"] == 4 and 0 < live["confidence"] <= 1  # every request watched at rate 1
        confidence = server.metric("taskmoe_pattern_confidence", 'pattern="sort"')
        assert confidence == pytest.approx(live["recent_confidence"])
        show = ["patterns", "show", "sort", "--store", str(store), "--server", server.url]
        capsys.readouterr()
        assert main([*show, "--admin-key", "k"]) == 0
        assert json.loads(capsys.readouterr().out)["coverage"]["live"]["samples"] >= live["samples"]
        assert main([*show, "--admin-key", "wrong"]) == 2
        assert "403 this key is not the admin key" in capsys.readouterr().err
