"""Expert slots in the checkpoint's precision (`--expert-dtype`): FP8 values and scales, dequantized per pass.

The reference for every row is the model of the same checkpoint dequantized into float32 by DeepSeek's
formula, written out here block by block (`_reference_checkpoint`), with its routers masked as the row's
pattern: a pool whose slots hold FP8 must compute exactly what that model computes, as must a pool whose
slots were dequantized when loaded.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pattern_store.selection import Selection
from server.cache import VariantKey
from server.expert_pool import ExpertPool
from server.leases import pool_slots
from server.model.pooled import PooledModel, RowRoute, pool_expert_format
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_block_fp8, save_random_model

BLOCKS = {"published": (128, 128), "partial-edges": (24, 24)}


def _reference_checkpoint(fp8: Path, out: Path) -> Path:
    """`fp8` with every FP8 weight replaced by float(q[i, j]) * s[i // b0, j // b1], computed element by block
    with plain indexing: an independent copy of the formula."""
    config = json.loads((fp8 / "config.json").read_text())
    b0, b1 = config.pop("quantization_config")["weight_block_size"]
    stored = load_file(fp8 / "model.safetensors")
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale = stored[f"{name}_scale_inv"].float()
            weight = tensor.float()
            for i in range(math.ceil(weight.shape[0] / b0)):
                for j in range(math.ceil(weight.shape[1] / b1)):
                    weight[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] *= scale[i, j]
            tensors[name] = weight
        else:
            tensors[name] = tensor.float()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (fp8 / extra).is_file():
            shutil.copy2(fp8 / extra, out / extra)
    return out


@pytest.fixture(scope="module", params=sorted(BLOCKS), ids=sorted(BLOCKS))
def fp8_pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DeepSeek-V3 checkpoint as block-FP8 (as DeepSeek publishes it) and its float32 reference."""
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    source = save_random_model(moe_configs()["deepseek_v3"], root / "source")
    fp8 = save_block_fp8(source, root / "fp8", block=BLOCKS[request.param])
    return fp8, _reference_checkpoint(fp8, root / "reference")


PATTERNS = {"a": (0, 1, 4, 5), "b": (1, 2, 5, 6), "c": (2, 3, 6, 7)}  # two kept in each expert group


def _routes(builder: VariantBuilder) -> list[RowRoute]:
    layers = sorted(builder.sparse_layers)
    return [RowRoute(name, dict.fromkeys(layers, kept)) for name, kept in PATTERNS.items()] + [RowRoute("full")]


@pytest.mark.parametrize("expert_dtype", ["auto", "float32"], ids=["fp8-slots", "dequantized-slots"])
def test_pool_rows_equal_the_reference_dequantized_model(fp8_pair, expert_dtype) -> None:
    fp8, reference = fp8_pair
    builder = VariantBuilder(fp8, dtype="float32")
    pool = ExpertPool(PooledModel(builder, slots=8, expert_dtype=expert_dtype))
    assert pool.pooled.expert_dtype == ("fp8" if expert_dtype == "auto" else "float32")
    routes = _routes(builder)
    leases = [pool.acquire(VariantKey(route.label), route) for route in routes]
    x = torch.randint(0, 64, (len(routes), 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), pool.pooled.rows([lease.route for lease in leases]):
        mixed = pool.pooled.model(x).logits
    expected_builder = VariantBuilder(reference, dtype="float32")
    with torch.no_grad():
        for row, route in enumerate(routes):
            selection = Selection("moe_experts", {k: list(v) for k, v in route.kept.items()}) if route.kept else None
            expected = expected_builder.build(selection)(x[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5, msg=route.label)
    for lease in leases:
        pool.release(lease)


def test_fp8_slots_cost_their_values_and_scales(fp8_pair) -> None:
    fp8, _ = fp8_pair
    builder = VariantBuilder(fp8, dtype="bfloat16")
    fp8_pool = PooledModel(builder, slots=8)
    bf16_pool = PooledModel(builder, slots=8, expert_dtype="bfloat16")
    config = builder.config
    b0, b1 = config.quantization_config["weight_block_size"]
    hidden, size = config.hidden_size, config.moe_intermediate_size
    grid = 2 * math.ceil(size / b0) * math.ceil(hidden / b1) + math.ceil(hidden / b0) * math.ceil(size / b1)
    for index in builder.sparse_layers:
        assert fp8_pool.expert_bytes(index) == 3 * size * hidden + 4 * grid  # one byte per value, float32 scales
        assert bf16_pool.expert_bytes(index) == 2 * 3 * size * hidden
        allocated = sum(
            t.values.untyped_storage().nbytes() + t.scales.untyped_storage().nbytes()
            for t in fp8_pool.model.get_submodule(builder.sparse_layers[index].prefix).experts.slot_tensors.values()
        )
        assert allocated == 8 * fp8_pool.expert_bytes(index), "the slots allocate what they are said to cost"
    assert fp8_pool.slot_bytes < bf16_pool.slot_bytes


def test_fp8_slots_read_exactly_the_experts_fp8_bytes_and_scales(fp8_pair) -> None:
    fp8, _ = fp8_pair
    builder = VariantBuilder(fp8, dtype="float32")
    pool = ExpertPool(PooledModel(builder, slots=8))
    reader = builder.reader
    kept = PATTERNS["a"]
    expected = 0
    for index in builder.sparse_layers:
        for expert in kept:
            for name in builder.tensors.expert_names(builder.sparse_layers[index], expert):
                expected += reader.info(name).nbytes + reader.info(f"{name}_scale_inv").nbytes
    before = reader.bytes_read
    lease = pool.acquire(VariantKey("a"), RowRoute("a", dict.fromkeys(builder.sparse_layers, kept)))
    assert reader.bytes_read - before == expected
    pool.release(lease)


def test_a_budget_buys_about_twice_the_fp8_slots(fp8_pair) -> None:
    fp8, _ = fp8_pair
    builder = VariantBuilder(fp8, dtype="bfloat16")
    per_layer_bf16 = sum(builder.expert_bytes(index) for index in builder.sparse_layers)
    budget = 4 * per_layer_bf16
    fp8_slots = pool_slots(builder, budget, pool_expert_format(builder, "auto"))
    assert pool_slots(builder, budget, pool_expert_format(builder, "bfloat16")) == 4
    assert fp8_slots in (7, 8)  # 8 if the scales fit in the half the FP8 values leave, else 7


def test_expert_dtype_errors_are_clear(tmp_path, fp8_pair) -> None:
    plain = VariantBuilder(save_random_model(moe_configs()["qwen3_moe"], tmp_path / "plain"))
    with pytest.raises(ValueError, match="needs a checkpoint whose experts are fp8; this one stores its experts unq"):
        pool_expert_format(plain, "fp8")
    assert pool_expert_format(plain, "auto") is None
    fp8 = VariantBuilder(fp8_pair[0], dtype="bfloat16")
    with pytest.raises(ValueError, match=r"the model's dtype \(bfloat16, set by --dtype\)"):
        pool_expert_format(fp8, "float16")


def test_experts_quantized_in_some_layers_only_get_dequantized_slots(fp8_pair, tmp_path) -> None:
    """A checkpoint whose last layer's experts are left unquantized: slots hold the model's dtype (FP8 slots
    would fail at the first load of that layer), and rows still equal the reference."""
    fp8, reference = fp8_pair
    mixed = tmp_path / "mixed"
    shutil.copytree(fp8, mixed)
    tensors = load_file(fp8 / "model.safetensors")
    plain = load_file(reference / "model.safetensors")
    last = max(int(name.split(".")[2]) for name in tensors if ".experts." in name)
    prefix = f"model.layers.{last}.mlp.experts."
    tensors = {name: t for name, t in tensors.items() if not (name.startswith(prefix) and name.endswith("_inv"))}
    tensors |= {name: t for name, t in plain.items() if name.startswith(prefix)}
    save_file(tensors, mixed / "model.safetensors", metadata={"format": "pt"})
    builder = VariantBuilder(mixed, dtype="float32")
    assert pool_expert_format(builder, "auto") is None
    route = RowRoute("a", dict.fromkeys(builder.sparse_layers, PATTERNS["a"]))
    pool = ExpertPool(PooledModel(builder, slots=8))
    lease = pool.acquire(VariantKey("a"), route)
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    selection = Selection("moe_experts", {k: list(v) for k, v in route.kept.items()})
    with torch.no_grad():
        expected = VariantBuilder(reference, dtype="float32").build(selection)(x).logits
        torch.testing.assert_close(lease.model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    pool.release(lease)


def test_a_pass_dequantizes_many_slots_in_chunks_exactly() -> None:
    """More chosen slots than one chunk (`DEQUANTIZE_EXPERTS`), in any order, gate and up on their own grids:
    each equals float(q) * s written out block by block."""
    from server.model.quantized_slots import DEQUANTIZE_EXPERTS, Fp8Experts, Fp8SlotTensor

    generator = torch.Generator().manual_seed(0)
    block, parts, cols = (24, 24), (40, 40), 56
    slots = 3 * DEQUANTIZE_EXPERTS + 2
    tensor = Fp8SlotTensor(slots, parts, cols, Fp8Experts(block, torch.float32), torch.device("cpu"))
    raw = (torch.randint(0, 256, tensor.values.shape, dtype=torch.uint8, generator=generator) & 0x87) | 0x30
    tensor.values.view(torch.uint8).copy_(raw)
    tensor.scales.copy_(torch.rand(tensor.scales.shape, generator=generator) + 0.5)
    chosen = torch.randperm(slots, generator=generator)
    got = tensor.dequantize(chosen, torch.float32)
    for position, slot in enumerate(chosen.tolist()):
        expected = tensor.values[slot].float()
        for part, first_row in enumerate((0, 40)):
            for i in range(math.ceil(40 / 24)):
                for j in range(math.ceil(cols / 24)):
                    rows = slice(first_row + i * 24, min(first_row + 40, first_row + (i + 1) * 24))
                    expected[rows, j * 24 : (j + 1) * 24] *= tensor.scales[slot, part * 2 + i, j]
        torch.testing.assert_close(got[position], expected, rtol=0, atol=0)
