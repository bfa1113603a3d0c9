"""Block-FP8 and MXFP4 checkpoints, read as their releases publish them.

Every reference here is written from the format's definition, independently of `server.model.quantization`:
DeepSeek's `w[i, j] = float(q[i, j]) * s[i // b0, j // b1]` as a loop or an explicit expansion of the scale
grid, and MXFP4's e2m1 table and e8m0 powers of two nibble by nibble (and transformers' own gpt-oss converter).
transformers' `Fp8Dequantize` is not a reference: it derives the block from the grid, wrong for partial blocks.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pattern_store.selection import Selection
from server.model.checkpoint import CheckpointError, CheckpointReader
from server.model.quantization import (
    QuantizationConfig,
    QuantizationError,
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    read_quantization,
)
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_block_fp8, save_random_model

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _fp8(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)


def _expanded(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The formula by explicit expansion of the scale grid to one scale per value (cut at the edges)."""
    rows, cols = q.shape[-2:]
    full = scale.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return q.float() * full


def write_reference_fp32(fp8_dir: Path, out_dir: Path) -> Path:
    """The FP8 checkpoint dequantized by the reference formula into an unquantized fp32 checkpoint."""
    config = json.loads((fp8_dir / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    config["dtype"] = "float32"
    tensors = {}
    with safe_open(str(fp8_dir / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        for name in names:
            if name.endswith("_scale_inv"):
                continue
            tensor = handle.get_tensor(name)
            scale = f"{name}_scale_inv"
            tensors[name] = _expanded(tensor, handle.get_tensor(scale), block) if scale in names else tensor.float()
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for file in fp8_dir.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
            (out_dir / file.name).write_bytes(file.read_bytes())
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# -- the formulas ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "cols", "block"), [(24, 40, (16, 16)), (7, 9, (3, 4)), (32, 32, (16, 16))])
def test_fp8_blocks_equal_the_formula_written_as_a_loop(rows, cols, block, scale_dtype) -> None:
    q = _fp8((2, rows, cols))
    scale = torch.rand(2, math.ceil(rows / block[0]), math.ceil(cols / block[1])).add(0.01).to(scale_dtype)
    expected = torch.empty(2, rows, cols)
    for k in range(2):
        for i in range(rows):
            for j in range(cols):
                expected[k, i, j] = float(q[k, i, j]) * float(scale[k, i // block[0], j // block[1]])
    assert torch.equal(dequantize_fp8_blocks(q, scale, block), expected)
    assert torch.equal(dequantize_fp8_blocks(q[0], scale[0], block, dtype=torch.bfloat16), expected[0].bfloat16())


def test_fp8_partial_edge_blocks_at_deepseek_shapes() -> None:
    """Hidden 160 in blocks of 128, and DeepSeek-V3's 576 rows of kv_a_proj_with_mqa: the last block is partial."""
    for rows, cols in [(160, 160), (576, 200)]:
        q = _fp8((rows, cols), seed=rows)
        scale = torch.rand(math.ceil(rows / 128), math.ceil(cols / 128)) + 0.5
        assert torch.equal(dequantize_fp8_blocks(q, scale, (128, 128)), _expanded(q, scale, (128, 128)))


def test_fp8_slices_count_blocks_from_the_full_tensor() -> None:
    q, block = _fp8((40, 24), seed=3), (16, 16)
    scale = torch.rand(3, 2) + 0.5
    full = _expanded(q, scale, block)
    part = dequantize_fp8_blocks(q[5:37, 3:20], scale[0:3, 0:2], block, origin=(5, 3))
    assert torch.equal(part, full[5:37, 3:20])


def test_fp8_scale_grid_of_the_wrong_shape_is_a_clear_error() -> None:
    with pytest.raises(QuantizationError, match=r"expected \[2, 3\]"):
        dequantize_fp8_blocks(_fp8((24, 40)), torch.ones(3, 3), (16, 16))


def test_mxfp4_equals_the_e2m1_table_nibble_by_nibble_and_transformers_converter() -> None:
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 4, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(120, 134, (3, 4, 2), dtype=torch.uint8, generator=generator)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # e2m1: the sign is bit 3
    expected = torch.empty(3, 4, 64)
    for e in range(3):
        for r in range(4):
            for g in range(2):
                for b in range(16):
                    byte = int(blocks[e, r, g, b])
                    for half, nibble in enumerate((byte & 0x0F, byte >> 4)):  # low nibble first
                        value = table[nibble & 7] * (-1 if nibble & 8 else 1)
                        expected[e, r, g * 32 + 2 * b + half] = value * 2.0 ** (int(scales[e, r, g]) - 127)
    got = dequantize_mxfp4(blocks, scales)
    assert torch.equal(got, expected)
    # transformers' gpt-oss loader: the same values, transposed to the module's [E, in, out]
    assert torch.equal(_convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), got.transpose(1, 2))


# -- the config ----------------------------------------------------------------------------------------------


def test_read_quantization() -> None:
    assert read_quantization({"model_type": "qwen3_moe"}) is None
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "modules_to_not_convert": ["x"]}
    assert read_quantization({"quantization_config": fp8}) == QuantizationConfig("fp8", "e4m3", (128, 128), ("x",))
    assert read_quantization({"quantization_config": {"quant_method": "mxfp4"}}).block == (1, 32)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"quant_method": "awq", "bits": 4}, r"quant_method 'awq' is not a format taskmoe reads \(it reads fp8"),
        ({"quant_method": "gptq"}, "'gptq' is not a format"),
        ({"quant_method": "compressed-tensors"}, "'compressed-tensors' is not a format"),
        ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not a format"),
        ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2' is not read"),
        ({"quant_method": "fp8", "fmt": "e4m3"}, "weight_block_size is None"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size is \[128\]"),
        ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "two positive block sizes"),
    ],
)
def test_unread_quantizations_are_clear_errors(section, message) -> None:
    with pytest.raises(QuantizationError, match=message) as raised:
        read_quantization({"quantization_config": section})
    assert "\n" not in str(raised.value)


# -- checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: save_random_model(moe_configs()[name], root / name) for name in ("deepseek_v3", "qwen3_moe")}


SELECTIONS = {
    "deepseek_v3": Selection("moe_experts", {1: [2, 3, 4, 5], 2: [0, 3, 6, 7]}),
    "qwen3_moe": Selection("moe_experts", {0: [6, 7], 2: [0, 2, 3]}),
}


def _logits(directory: Path, selection: Selection | None) -> torch.Tensor:
    model = VariantBuilder(directory, dtype="float32").build(selection)
    x = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(
    ("model_type", "block", "scale_dtype"),
    [
        ("deepseek_v3", (16, 16), torch.float32),  # kv_a_proj_with_mqa's 24 rows: a partial block
        ("deepseek_v3", (128, 128), torch.bfloat16),  # every block partial, as hidden 160 in blocks of 128
        ("qwen3_moe", (16, 16), torch.float16),
        ("qwen3_moe", (128, 128), torch.float32),
    ],
)
def test_fp8_variant_logits_equal_the_reference_dequantized_checkpoint(
    sources, tmp_path, model_type, block, scale_dtype
) -> None:
    fp8 = save_block_fp8(sources[model_type], tmp_path / "fp8", block=block, scale_dtype=scale_dtype)
    reference = write_reference_fp32(fp8, tmp_path / "reference")
    for selection in (SELECTIONS[model_type], None):
        got, expected = _logits(fp8, selection), _logits(reference, selection)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(_logits(sources[model_type], None), expected, atol=1e-4), "fp8 changes the weights"


def test_bytes_read_are_backbone_plus_kept_experts_fp8_bytes_and_scales(sources, tmp_path) -> None:
    fp8 = save_block_fp8(sources["deepseek_v3"], tmp_path / "fp8", block=(16, 16))
    builder = VariantBuilder(fp8, dtype="float32")
    selection = SELECTIONS["deepseek_v3"]
    backbone = experts = 0
    for name in builder.reader.names:  # stored tensors: fp8 weights and their scales count alike
        info = builder.reader.info(name)
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1)) if "layers." in name else -1
        kept = selection.kept(layer)
        match = _EXPERT.search(name)
        if match:
            experts += info.nbytes if kept is None or int(match.group(1)) in kept else 0
        elif name.endswith(("mlp.gate.weight", "gate.e_score_correction_bias")):
            experts += info.nbytes if kept is None else info.nbytes * len(kept) // info.shape[0]
        else:
            backbone += info.nbytes
    assert any(name.endswith("experts.2.up_proj.weight_scale_inv") for name in builder.reader.names)
    builder.build(selection)
    assert builder.reader.bytes_read == backbone + experts
    assert builder.reader.total_bytes == sum((fp8 / "model.safetensors").stat().st_size for _ in [0]) - _header(fp8)


def _header(directory: Path) -> int:
    with open(directory / "model.safetensors", "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_quantized_info_and_raw_rows(sources, tmp_path) -> None:
    fp8 = save_block_fp8(sources["qwen3_moe"], tmp_path / "fp8", block=(16, 16), scale_dtype=torch.bfloat16)
    reader = CheckpointReader(fp8)
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    info = reader.quantized_info(name)
    assert (info.format, info.data, info.scale, info.shape, info.block, info.scale_dtype) == (
        "fp8_e4m3",
        name,
        f"{name}_scale_inv",
        (32, 16),
        (16, 16),
        torch.bfloat16,
    )
    assert reader.quantized_info("model.layers.0.mlp.gate.weight") is None
    with safe_open(str(fp8 / "model.safetensors"), framework="pt") as handle:
        q, scale = handle.get_tensor(name), handle.get_tensor(f"{name}_scale_inv")
    raw = reader.rows_view(name, 0, 32)
    assert raw.dtype == torch.float8_e4m3fn and torch.equal(raw.view(torch.uint8), q.view(torch.uint8))
    before = reader.bytes_read
    assert torch.equal(reader.read(name), _expanded(q, scale, (16, 16)))
    assert reader.bytes_read - before == reader.stored_nbytes(name) == 32 * 16 + 2 * 1 * 2
    before = reader.bytes_read
    rows = reader.read_indices(name, [17, 18, 3], dim=0)  # rows 17:19 (block 1) and 3 (block 0)
    assert torch.equal(rows, _expanded(q, scale, (16, 16))[[17, 18, 3]])
    assert reader.bytes_read - before == 3 * 16 + 2 * 2
    columns = reader.read_indices(name, [15, 0], dim=1)
    assert torch.equal(columns, _expanded(q, scale, (16, 16))[:, [15, 0]])


# -- bad checkpoints -----------------------------------------------------------------------------------------


def _bad(tmp_path: Path, tensors: dict[str, torch.Tensor], quantization: dict | None) -> Path:
    directory = tmp_path / "bad"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"model_type": "qwen3_moe"} | ({"quantization_config": quantization} if quantization else {})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}


@pytest.mark.parametrize(
    ("tensors", "quantization", "message"),
    [
        ({"w.weight": _fp8((24, 40))}, FP8_CONFIG, "fp8 tensor w.weight has no scale w.weight_scale_inv"),
        (
            {"w.weight": _fp8((24, 40)), "w.weight_scale_inv": torch.ones(1, 2)},
            FP8_CONFIG,
            r"w.weight_scale_inv has shape \[1, 2\], but w.weight \[24, 40\] in the config's blocks of \[16, 16\] "
            r"needs \[2, 3\] \(the stored grid implies blocks of \[24, 20\]\)",
        ),
        (
            {"w.weight": _fp8((256, 256)), "w.weight_scale_inv": torch.ones(2, 2)},
            FP8_CONFIG,
            r"needs \[16, 16\] \(the stored grid implies blocks of \[128, 128\]\)",
        ),
        (
            {"w.weight": torch.ones(4, 4), "w.weight_scale_inv": torch.ones(1, 1)},
            FP8_CONFIG,
            "w.weight_scale_inv is a scale for w.weight, which is not a quantized tensor",
        ),
        ({"w.weight": _fp8((4, 4)), "w.weight_scale_inv": torch.ones(1, 1)}, None, "has no quantization_config"),
        (
            {"w.weight": _fp8((4, 4)), "w.weight_scale_inv": torch.ones(1, 1, dtype=torch.int32)},
            FP8_CONFIG,
            "fp8 block scales are float32, bfloat16 or float16",
        ),
        ({"w": torch.ones(2)}, {"quant_method": "awq"}, "'awq' is not a format taskmoe reads"),
        (
            {"e.gate_up_proj_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8)},
            {"quant_method": "mxfp4"},
            "mxfp4 tensor e.gate_up_proj_blocks has no scales e.gate_up_proj_scales",
        ),
    ],
)
def test_bad_quantized_checkpoints_are_one_clear_line(tmp_path, tensors, quantization, message) -> None:
    directory = _bad(tmp_path, tensors, quantization)
    with pytest.raises(CheckpointError, match=message) as raised:
        CheckpointReader(directory)
    assert "\n" not in str(raised.value) and str(directory) in str(raised.value)


def test_pool_slots_loaded_from_fp8_equal_the_fp8_variants(sources, tmp_path) -> None:
    from server.cache import VariantKey
    from server.expert_pool import ExpertPool
    from server.model.pooled import PooledModel, RowRoute

    fp8 = save_block_fp8(sources["qwen3_moe"], tmp_path / "fp8", block=(16, 16))
    builder = VariantBuilder(fp8, dtype="float32")
    pool = ExpertPool(PooledModel(builder, slots=8))
    kept = {layer: tuple(SELECTIONS["qwen3_moe"].kept(layer)) for layer in (0, 2)}
    lease = pool.acquire(VariantKey("a"), RowRoute("a", kept))
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pool.pooled.rows([lease.route]):
        pooled = pool.pooled.model(x).logits
    with torch.no_grad():
        expected = builder.build(SELECTIONS["qwen3_moe"])(x).logits
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    pool.release(lease)


# -- export ---------------------------------------------------------------------------------------------------


def _stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return tensors


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor


@pytest.mark.parametrize("block", [(16, 16), (128, 128)])
def test_fp8_export_keeps_fp8_with_scales_sliced_to_the_kept_experts(sources, tmp_path, block) -> None:
    from server.model.export import export_variant

    fp8 = save_block_fp8(sources["qwen3_moe"], tmp_path / "fp8", block=block, scale_dtype=torch.bfloat16)
    selection = Selection("moe_experts", {0: [1, 6], 2: [3, 7]})
    export_variant(VariantBuilder(fp8), selection, tmp_path / "out")
    source, exported = _stored_tensors(fp8), _stored_tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert config.get("num_experts", config.get("num_local_experts")) == 2
    for layer, kept in selection.layers.items():
        for position, expert in enumerate(kept):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                for suffix in (".weight", ".weight_scale_inv"):
                    ours = exported[f"model.layers.{layer}.mlp.experts.{position}.{projection}{suffix}"]
                    theirs = source[f"model.layers.{layer}.mlp.experts.{expert}.{projection}{suffix}"]
                    assert ours.dtype == theirs.dtype and torch.equal(_bits(ours), _bits(theirs))
    assert exported["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn  # the dense layer too
    assert "model.layers.0.mlp.experts.2.gate_proj.weight" not in exported
    # the export loads as the original does: through taskmoe's reader, to the same logits as the source's variant
    torch.testing.assert_close(_logits(tmp_path / "out", None), _logits(fp8, selection), rtol=1e-6, atol=1e-6)


def test_fp8_export_reloads_with_plain_transformers_in_the_aligned_case(sources, tmp_path) -> None:
    """transformers loads block-FP8 on a CPU only through accelerate (its dequantizing loader needs it)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from server.model.export import export_variant

    fp8 = save_block_fp8(sources["qwen3_moe"], tmp_path / "fp8", block=(16, 16))
    selection = Selection("moe_experts", {0: [1, 6], 2: [3, 7]})
    export_variant(VariantBuilder(fp8), selection, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    x = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, _logits(fp8, selection), rtol=1e-2, atol=1e-2)


def test_export_with_a_dtype_dequantizes_and_drops_the_quantization_config(sources, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from server.model.export import export_variant

    fp8 = save_block_fp8(sources["deepseek_v3"], tmp_path / "fp8", block=(16, 16))
    selection = SELECTIONS["deepseek_v3"]
    export_variant(VariantBuilder(fp8, dtype="float32"), selection, tmp_path / "out", keep_quantization=False)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not any(name.endswith("_scale_inv") for name in _stored_tensors(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, _logits(fp8, selection), rtol=1e-5, atol=1e-5)


# -- a pattern of another precision ----------------------------------------------------------------------------


def test_a_pattern_calibrated_on_the_bf16_release_says_so_on_the_fp8_one(sources, tmp_path) -> None:
    from pattern_store.pattern import PatternError, TaskPattern
    from server.model.checkpoint import model_fingerprint, model_identity

    fp8 = save_block_fp8(sources["qwen3_moe"], tmp_path / "Qwen3-tiny-FP8", block=(16, 16))
    bf16, quantized = model_identity(sources["qwen3_moe"]), model_identity(fp8)
    assert bf16["architecture"] == quantized["architecture"]
    assert (bf16["precision"], quantized["precision"]) == ("float32", "fp8 e4m3, blocks [16, 16]")
    other = model_identity(sources["deepseek_v3"])
    assert other["architecture"] != bf16["architecture"]
    pattern = TaskPattern(
        name="arith",
        selection=SELECTIONS["qwen3_moe"],
        scores={},
        method="tcess",
        parameters={},
        model_fingerprint=model_fingerprint(sources["qwen3_moe"]),
        created=0.0,
        calibration_prompts=1,
        model=bf16,
    )
    with pytest.raises(PatternError) as raised:
        pattern.check_model(model_fingerprint(fp8), quantized)
    message = str(raised.value)
    assert "calibrated on model qwen3_moe (float32, " in message and "this model Qwen3-tiny-FP8 (fp8 e4m3" in message
    assert "the same architecture and tensor names in another precision" in message
    assert "re-calibrate it on this checkpoint" in message and "\n" not in message
    with pytest.raises(PatternError, match="a different architecture"):
        pattern.check_model(model_fingerprint(sources["deepseek_v3"]), other)
    restored = TaskPattern.from_parts(pattern.document("t.safetensors"), pattern.tensors())
    assert restored.model == bf16


# -- end to end ------------------------------------------------------------------------------------------------


def _demo_store_for(model_dir: Path, root: Path) -> Path:
    """The demo's patterns, recorded as calibrated on `model_dir` (the same selections for both servers)."""
    from pattern_store.store import PatternStore
    from server.model.checkpoint import model_fingerprint, model_identity

    from conftest import DEMO_MOE

    source = PatternStore(DEMO_MOE / "patterns", create=False)
    store = PatternStore(root / "patterns")
    for name in source.names():
        pattern = source.get(name)
        pattern.model_fingerprint, pattern.model = model_fingerprint(model_dir), model_identity(model_dir)
        store.add(pattern)
    return root / "patterns"


def _served_answers(
    model_dir: Path, store: Path, prompts: list[tuple[str, str]], expert_dtype: str | None = None
) -> list[str]:
    """Greedy answers of the real server; with `expert_dtype`, its /admin/cache must say the pool's slots hold
    that."""
    import httpx

    from server.config import ServerConfig

    from server_harness import running_server

    answers = []
    config = ServerConfig(model=model_dir, store=store, api_key="k", admin_key="a", workers=2)
    with running_server(config) as server:
        if expert_dtype is not None:
            cache = httpx.get(f"{server.url}/admin/cache", headers={"Authorization": "Bearer a"}, timeout=30)
            assert cache.json()["pool"]["expert_dtype"] == expert_dtype, cache.text
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
            assert f'taskmoe_pool_capacity_bytes{{expert_dtype="{expert_dtype}"}}' in metrics
        for model, prompt in prompts:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
            reply = httpx.post(
                f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}, timeout=120
            )
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
    return answers


@pytest.mark.slow
def test_served_fp8_demo_answers_equal_the_reference_dequantized_checkpoint(tmp_path) -> None:
    """models/demo-moe in block-FP8 (blocks of 128: k_proj/v_proj's 64 rows a partial block), served by the real
    server, answers every demo prompt as the same checkpoint dequantized by DeepSeek's formula into fp32."""
    from demo.evaluate import EVAL_SEED
    from demo.tasks import get_task

    from conftest import DEMO_MOE

    fp8 = save_block_fp8(DEMO_MOE, tmp_path / "fp8" / "demo-moe", block=(128, 128))
    reference = write_reference_fp32(fp8, tmp_path / "reference" / "demo-moe")
    tasks = ("arith", "reverse", "sort", "upper", "spell", "translate")
    prompts = [
        (model, example.prompt)
        for task in tasks
        for example in get_task(task).examples(2, EVAL_SEED)
        for model in (f"demo-moe@{task}", "demo-moe")
    ]
    served = _served_answers(fp8, _demo_store_for(fp8, tmp_path / "fp8"), prompts, expert_dtype="fp8")
    expected = _served_answers(
        reference, _demo_store_for(reference, tmp_path / "reference"), prompts, expert_dtype="float32"
    )
    assert served == expected
    assert len(set(served)) > len(tasks), "the answers differ from task to task"


def test_mxfp4_experts_read_in_the_gpt_oss_module_layout(tmp_path) -> None:
    """gpt-oss stores `experts.gate_up_proj_blocks` [E, 2I, H/32, 16] and `_scales` [E, 2I, H/32]; its module holds
    `gate_up_proj` [E, H, 2I]. (The gpt_oss family itself is another part of the work: this is the reader.)"""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    prefix = "model.layers.0.mlp.experts"
    tensors = {
        f"{prefix}.gate_up_proj_blocks": torch.randint(0, 256, (4, 16, 2, 16), dtype=torch.uint8, generator=generator),
        f"{prefix}.gate_up_proj_scales": torch.randint(120, 134, (4, 16, 2), dtype=torch.uint8, generator=generator),
        f"{prefix}.gate_up_proj_bias": torch.randn(4, 16),
    }
    directory = _bad(tmp_path, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.attn"]})
    reader = CheckpointReader(directory)
    name = f"{prefix}.gate_up_proj"
    expected = _convert_moe_packed_tensors(
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"], dtype=torch.float32
    )  # [E, H, 2I]
    assert name in reader and reader.info(name).shape == (4, 64, 16) == tuple(expected.shape)
    info = reader.quantized_info(name)
    assert (info.format, info.data, info.scale, info.transposed) == ("mxfp4", f"{name}_blocks", f"{name}_scales", True)
    assert torch.equal(reader.read(name), expected)
    before = reader.bytes_read
    assert torch.equal(reader.read_indices(name, [3, 1, 2]), expected[[3, 1, 2]])
    assert reader.bytes_read - before == 3 * (16 * 2 * 16 + 16 * 2)
    assert torch.equal(reader.rows_view(f"{name}_blocks", 1, 2)[0], tensors[f"{name}_blocks"][1])
    with pytest.raises(CheckpointError, match="stored as mxfp4 blocks and scales"):
        reader.rows_view(name, 0, 1)
    assert reader.quantized_info(f"{prefix}.gate_up_proj_bias") is None


@pytest.mark.slow
def test_calibration_from_fp8_streams_layer_by_layer(tmp_path) -> None:
    """Statistics and the layer-local refinement of an FP8 checkpoint hold one layer at a time, dequantized:
    well below the FP8 checkpoint's own size, under 15% of the model loaded whole (the memory test of
    tests/test_calibration.py, on FP8)."""
    import os
    import subprocess
    import sys

    from test_calibration import PEAK_SCRIPT, ROOT
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=16,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    source = save_random_model(config, tmp_path / "source")
    fp8 = save_block_fp8(source, tmp_path / "fp8")
    for file in source.glob("*.safetensors"):
        file.unlink()  # disk, not memory: the source is not needed any more
    checkpoint_bytes = (fp8 / "model.safetensors").stat().st_size
    assert checkpoint_bytes > 80e6

    script = PEAK_SCRIPT.replace("len(result) == 8 and ", "len(result) == 16 and ")
    assert script != PEAK_SCRIPT

    def peak(mode: str) -> int:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(
            [sys.executable, "-c", script, str(fp8), mode],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["added"]

    # fp32 layers (4 bytes a value, the fp8 checkpoint's 1): bf16 on a CPU adds a fixed ~45 MB of kernel scratch
    # space, fp8 or not, which would hide what is measured here at this size
    calibration, refinement = peak("calibrate"), peak("refine")
    full = 4 * checkpoint_bytes  # what loading the whole model dequantized holds
    assert calibration < 0.15 * full and calibration < 0.6 * checkpoint_bytes, (calibration, checkpoint_bytes)
    assert refinement < 0.15 * full and refinement < 0.6 * checkpoint_bytes, (refinement, checkpoint_bytes)
    print(f"fp8 checkpoint {checkpoint_bytes / 1e6:.0f} MB: calibration +{calibration / 1e6:.0f} MB, "
          f"refinement +{refinement / 1e6:.0f} MB")  # fmt: skip


def test_a_server_on_an_unread_checkpoint_says_why_in_one_line_without_a_traceback(sources, tmp_path, caplog) -> None:
    """`taskmoe serve` on an AWQ checkpoint: /health and the log carry the one-line reason, no traceback."""
    import logging
    import shutil

    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    model = tmp_path / "awq"
    shutil.copytree(sources["qwen3_moe"], model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.ERROR, logger="taskmoe.app"), TestClient(create_app(ServerConfig(model=model))) as c:
        deadline = time.monotonic() + 60  # the model loads in the background: /health is 200 until it fails
        health = c.get("/health")
        while health.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            health = c.get("/health")
    assert health.status_code == 503
    assert "quant_method 'awq' is not a format taskmoe reads" in health.text
    failures = [record for record in caplog.records if "failed" in record.getMessage()]
    assert failures and "'awq' is not a format" in failures[0].getMessage()
    assert all(record.exc_info is None for record in failures), "a bad checkpoint is a message, not a traceback"


def test_a_sharded_fp8_checkpoint_with_scales_in_other_shards_reads_the_same(sources, tmp_path) -> None:
    """Hub FP8 releases are sharded, and a weight's `weight_scale_inv` may sit in another shard than the weight:
    variants and the pool's FP8 slots read such a checkpoint exactly as its single-file twin."""
    from server.cache import VariantKey
    from server.expert_pool import ExpertPool
    from server.model.pooled import PooledModel, RowRoute

    single = save_block_fp8(sources["deepseek_v3"], tmp_path / "single", block=(16, 16))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    tensors = load_file(single / "model.safetensors")
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for number, name in enumerate(sorted(tensors)):
        shards[number % 2][name] = tensors[name]  # sorted names alternate: a weight and its scale part ways
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-00002.safetensors"
        save_file(shard, str(sharded / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    split = [n for n in tensors if n.endswith("_scale_inv") and weight_map[n] != weight_map[n[: -len("_scale_inv")]]]
    assert split, "some weights and their scales are in different shards"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in ("config.json", "generation_config.json"):
        if (single / extra).is_file():
            (sharded / extra).write_text((single / extra).read_text())
    selection = SELECTIONS["deepseek_v3"]
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = VariantBuilder(single, dtype="float32").build(selection)(x).logits
        got = VariantBuilder(sharded, dtype="float32").build(selection)(x).logits
        assert torch.equal(got, expected)
        builder = VariantBuilder(sharded, dtype="float32")
        pool = ExpertPool(PooledModel(builder, slots=8))
        assert pool.pooled.expert_dtype == "fp8"
        kept = {layer: tuple(experts) for layer, experts in selection.layers.items()}
        lease = pool.acquire(VariantKey("s"), RowRoute("s", kept))
        torch.testing.assert_close(lease.model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
        pool.release(lease)
