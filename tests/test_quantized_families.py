"""The contract tests of every family whose releases ship quantized experts, on checkpoints written as they ship.

Each family whose `formats` name "fp8-block" or "mxfp4" gets a tiny random checkpoint in its release's layout
(block-FP8 with the release's `quantization_config` and scale dtype, in blocks of 24 so that edge blocks are
partial, and once in the published blocks of 128; gpt-oss's MXFP4 experts as openai/gpt-oss-20b stores them),
and a reference checkpoint written here from the formats' definitions, independently of
`server.model.quantization`: DeepSeek's `w[i, j] = float(q[i, j]) * s[i // b0, j // b1]` block by block, and
MXFP4's nibbles (low first) looked up in the e2m1 table with the sign bit apart, times `2 ** (e8m0 - 127)`.
Everything taskmoe does with experts must give on the quantized checkpoint what it gives on the reference:
variants, the expert pool's mixed batches (FP8 slots and dequantized slots), the bytes a pattern reads,
calibration statistics and an export that plain transformers reloads.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pattern_store.selection import Selection
from server.cache import VariantKey
from server.expert_pool import ExpertPool
from server.model.calibrate import collect_statistics
from server.model.export import export_variant
from server.model.families import FAMILIES
from server.model.pooled import PooledModel, RowRoute
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_block_fp8, save_mxfp4_gpt_oss, save_random_model

#: the quantization_config and scale dtype each family's block-FP8 release ships (the block is the case's)
FP8_RELEASES: dict[str, tuple[dict, torch.dtype]] = {
    # deepseek-ai/DeepSeek-V3: float32 scales, no modules_to_not_convert
    "deepseek_v3": ({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}, torch.float32),
    # Qwen/Qwen3-30B-A3B-FP8: the scales in the model's bf16
    "qwen3_moe": ({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}, torch.bfloat16),
    "glm4_moe": ({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}, torch.float32),
    # MiniMaxAI/MiniMax-M2 names the format by its torch dtype
    "minimax_m2": (
        {
            "activation_scheme": "dynamic",
            "fmt": "float8_e4m3fn",
            "quant_method": "fp8",
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
        },
        torch.float32,
    ),
}
DEFAULT_FP8_RELEASE = FP8_RELEASES["deepseek_v3"]


@dataclass(frozen=True)
class Case:
    model_type: str
    format: str  # "fp8-block" or "mxfp4"
    block: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.format}" + (f"-{self.block[0]}" if self.block else "")


def _cases() -> list[Case]:
    cases = []
    for family in FAMILIES:
        for model_type in family.model_types if family.kind == "moe" else ():
            if "fp8-block" in family.formats:
                cases.append(Case(model_type, "fp8-block", (24, 24)))
            if "mxfp4" in family.formats:
                cases.append(Case(model_type, "mxfp4"))
    return [*cases, Case("minimax_m2", "fp8-block", (128, 128))]


CASES = _cases()


def test_every_family_released_quantized_is_covered() -> None:
    covered = {case.model_type for case in CASES}
    assert {"deepseek_v3", "qwen3_moe", "glm4_moe", "minimax_m2", "gpt_oss"} <= covered
    assert {case.format for case in CASES} == {"fp8-block", "mxfp4"}


# -- the reference, from the formats' definitions ----------------------------------------------------------------

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitude of nibble & 7; bit 3 is the sign


def _fp8_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float(q[i, j]) * s[i // b0, j // b1], block by block with plain indexing."""
    b0, b1 = block
    weight = q.float()
    for i in range(math.ceil(weight.shape[0] / b0)):
        for j in range(math.ceil(weight.shape[1] / b1)):
            weight[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] *= float(scale[i, j])
    return weight


def _mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., R, G, 16] bytes with [..., R, G] e8m0 scales -> [..., R, 32 G]: byte b of group g holds values
    32 g + 2 b (its low nibble) and 32 g + 2 b + 1 (its high nibble)."""
    nibbles = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()  # [..., R, G, 32]
    magnitude = torch.tensor(E2M1)[nibbles & 7]
    sign = 1.0 - 2.0 * ((nibbles & 8) > 0).float()
    power = torch.pow(2.0, scales.double() - 127).float().unsqueeze(-1)
    return (sign * magnitude * power).flatten(-2)


def write_reference(quantized: Path, out: Path) -> Path:
    """`quantized` with every quantized tensor dequantized by its format's definition, into float32 under the
    name the model reads (gpt-oss's `X_blocks`/`X_scales` [E, out, in/32, ...] as `X` [E, in, out])."""
    config = json.loads((quantized / "config.json").read_text())
    section = config.pop("quantization_config")
    config["dtype"] = "float32"
    stored = load_file(quantized / "model.safetensors")
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith(("_scale_inv", "_scales")):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensors[name] = _fp8_reference(tensor, stored[f"{name}_scale_inv"], tuple(section["weight_block_size"]))
        elif name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            tensors[base] = _mxfp4_reference(tensor, stored[f"{base}_scales"]).transpose(-1, -2).contiguous()
        else:
            tensors[name] = tensor.float()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (quantized / "generation_config.json").is_file():
        shutil.copy2(quantized / "generation_config.json", out / "generation_config.json")
    return out


# -- the checkpoints -----------------------------------------------------------------------------------------------


def _write_quantized(case: Case, source: Path, out: Path) -> Path:
    """The source checkpoint as the family's release ships it."""
    if case.format == "mxfp4":
        return save_mxfp4_gpt_oss(source, out)
    section, scale_dtype = FP8_RELEASES.get(case.model_type, DEFAULT_FP8_RELEASE)
    save_block_fp8(source, out, block=case.block, scale_dtype=scale_dtype)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {**section, "weight_block_size": list(case.block)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class Checkpoints:
    case: Case
    source: Path
    quantized: Path
    reference: Path


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def checkpoints(request, tmp_path_factory) -> Checkpoints:
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.id)
    config = moe_configs()[case.model_type]
    if case.format == "mxfp4":
        config.intermediate_size = 32  # MXFP4 groups 32 values of a row: gpt-oss's rows are 2880 (90 groups)
    source = save_random_model(config, root / "source")
    quantized = _write_quantized(case, source, root / "quantized")
    return Checkpoints(case, source, quantized, write_reference(quantized, root / "reference"))


def _patterns(builder: VariantBuilder) -> dict[str, dict[int, tuple[int, ...]]]:
    """Three patterns that overlap in part, valid under the family's routing rule (as tests/test_expert_pool.py's):
    with group-limited routing over two groups of four, the same number kept in each group."""
    layers = sorted(builder.sparse_layers)
    if builder.family.balanced_groups(builder.config) > 1:
        shapes = [(0, 1, 4, 5), (1, 2, 5, 6), (2, 3, 6, 7)]
    else:
        shapes = [(0, 1, 2), (2, 3, 4, 5), (5, 6, 7)]
    return {name: {layer: shapes[(i + j) % 3] for j, layer in enumerate(layers)} for i, name in enumerate("abc")}


def _selection(kept: dict[int, tuple[int, ...]] | None) -> Selection | None:
    return Selection("moe_experts", {layer: list(e) for layer, e in kept.items()}) if kept else None


X = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _close(got: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
    """Within 1e-5 relative to the largest logit."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale, msg=message or None)


# -- the tests -----------------------------------------------------------------------------------------------------


def test_the_checkpoint_is_stored_as_the_release_stores_it(checkpoints) -> None:
    stored = load_file(checkpoints.quantized / "model.safetensors")
    config = json.loads((checkpoints.quantized / "config.json").read_text())["quantization_config"]
    if checkpoints.case.format == "mxfp4":
        assert config["quant_method"] == "mxfp4"
        blocks = stored["model.layers.0.mlp.experts.gate_up_proj_blocks"]
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (8, 64, 1, 16)  # [E, 2I, H/32, 16]
        assert tuple(stored["model.layers.0.mlp.experts.down_proj_scales"].shape) == (8, 32, 1)  # [E, H, I/32]
        assert stored["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype == torch.bfloat16
        assert stored["model.layers.0.mlp.router.weight"].dtype == torch.bfloat16
        assert not any(t.dtype == torch.float32 for t in stored.values())
        # the reference's reading of the blocks is transformers' own gpt-oss converter's, and the quantization
        # is faithful to the source within e2m1's precision
        from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

        reference = load_file(checkpoints.reference / "model.safetensors")
        source = load_file(checkpoints.source / "model.safetensors")
        for name in ("gate_up_proj", "down_proj"):
            name = f"model.layers.1.mlp.experts.{name}"
            converted = _convert_moe_packed_tensors(
                stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=torch.float32
            )
            assert torch.equal(reference[name], converted)
            assert float((reference[name] - source[name]).norm() / source[name].norm()) < 0.2
    else:
        assert config["weight_block_size"] == list(checkpoints.case.block)
        experts = [name for name in stored if ".experts.0." in name and name.endswith(".weight")]
        assert experts and all(stored[name].dtype == torch.float8_e4m3fn for name in experts)
        assert all(f"{name}_scale_inv" in stored for name in experts)
    # the quantized weights differ from the source's: the reference is not the source in disguise
    source, reference = VariantBuilder(checkpoints.source, dtype="float32"), VariantBuilder(checkpoints.reference)
    assert not torch.allclose(_logits(source.build()), _logits(reference.build()), atol=1e-4)


def test_variant_logits_equal_the_reference_variants(checkpoints) -> None:
    quantized = VariantBuilder(checkpoints.quantized, dtype="float32")
    reference = VariantBuilder(checkpoints.reference, dtype="float32")
    pattern = _patterns(quantized)["a"]
    for selection in (_selection(pattern), None):
        _close(_logits(quantized.build(selection)), _logits(reference.build(selection)))
    assert not torch.allclose(_logits(quantized.build(_selection(pattern))), _logits(quantized.build()), atol=1e-4)


@pytest.mark.parametrize("expert_dtype", ["auto", "float32"], ids=["auto-slots", "dequantized-slots"])
def test_pool_mixed_batch_equals_the_reference_variants(checkpoints, expert_dtype) -> None:
    builder = VariantBuilder(checkpoints.quantized, dtype="float32")
    pool = ExpertPool(PooledModel(builder, slots=8, expert_dtype=expert_dtype))
    in_checkpoint_precision = {"fp8-block": "fp8", "mxfp4": "mxfp4"}[checkpoints.case.format]
    assert pool.pooled.expert_dtype == (in_checkpoint_precision if expert_dtype == "auto" else "float32")
    patterns = _patterns(builder)
    routes = [RowRoute(name, kept) for name, kept in patterns.items()] + [RowRoute("full")]
    leases = [pool.acquire(VariantKey(route.label), route) for route in routes]
    x = torch.randint(0, 64, (len(routes), 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), pool.pooled.rows([lease.route for lease in leases]):
        mixed = pool.pooled.model(x).logits
    reference = VariantBuilder(checkpoints.reference, dtype="float32")
    for row, route in enumerate(routes):
        expected = _logits(reference.build(_selection(dict(route.kept))), x[row : row + 1])[0]
        _close(mixed[row], expected, route.label)
    assert not torch.allclose(mixed[0], _logits(reference.build(), x[:1])[0], atol=1e-4)
    for lease in leases:
        pool.release(lease)


def _stored_sizes(directory: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every stored tensor's shape and byte count, from the safetensors header."""
    with open(directory / "model.safetensors", "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {
        name: (tuple(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0])
        for name, entry in header.items()
    }


_PER_EXPERT = re.compile(r"layers\.(\d+)\.\w+\.experts\.(\d+)\.")  # experts.N.gate_proj.weight(_scale_inv)
_FUSED = re.compile(r"layers\.(\d+)\.\w+\.experts\.\w+$")  # gpt-oss: experts.gate_up_proj_blocks [E, ...]


def _expert_bytes(directory: Path, kept: dict[int, tuple[int, ...]]) -> int:
    """The stored bytes (values and scales, biases where the family has them) of the kept experts."""
    total = 0
    for name, (shape, nbytes) in _stored_sizes(directory).items():
        per_expert, fused = _PER_EXPERT.search(name), _FUSED.search(name)
        if per_expert and int(per_expert.group(2)) in kept.get(int(per_expert.group(1)), ()):
            total += nbytes
        elif fused and int(fused.group(1)) in kept:
            total += nbytes // shape[0] * len(kept[int(fused.group(1))])
    return total


@pytest.mark.parametrize("expert_dtype", ["auto", "float32"], ids=["auto-slots", "dequantized-slots"])
def test_a_pattern_reads_its_experts_stored_bytes_and_scales_exactly(checkpoints, expert_dtype) -> None:
    builder = VariantBuilder(checkpoints.quantized, dtype="float32")
    pool = ExpertPool(PooledModel(builder, slots=8, expert_dtype=expert_dtype))
    kept = _patterns(builder)["a"]
    expected = _expert_bytes(checkpoints.quantized, kept)
    assert expected > 0
    before = builder.reader.bytes_read
    lease = pool.acquire(VariantKey("a"), RowRoute("a", kept))
    assert builder.reader.bytes_read - before == expected
    pool.release(lease)


def test_slots_in_the_checkpoint_precision_cost_its_stored_bytes(checkpoints) -> None:
    """A slot of the default pool costs one expert's stored values and scales (FP8 or MXFP4), plus its biases in
    the model's dtype, and allocates exactly that; a dequantized slot costs the model's dtype."""
    builder = VariantBuilder(checkpoints.quantized, dtype="bfloat16")
    pooled = PooledModel(builder, slots=8)
    every = {layer: tuple(range(8)) for layer in builder.sparse_layers}
    stored = _expert_bytes(checkpoints.quantized, every)  # values, scales and (gpt-oss) bf16 biases of 8 experts
    assert sum(8 * pooled.expert_bytes(layer) for layer in builder.sparse_layers) == stored
    for layer in builder.sparse_layers.values():
        experts = pooled.model.get_submodule(layer.prefix).experts
        allocated = sum(t.untyped_storage().nbytes() for t in _slot_storages(experts))
        assert allocated == 8 * pooled.expert_bytes(layer.index)
    dequantized = PooledModel(builder, slots=8, expert_dtype="bfloat16")
    assert pooled.slot_bytes < 0.6 * dequantized.slot_bytes


def _slot_storages(experts) -> list[torch.Tensor]:
    tensors = []
    for slot in experts.slot_tensors.values():
        tensors += [slot.values, slot.scales] if hasattr(slot, "values") else [slot.blocks, slot.scales]
    return tensors + [experts.other_tensor(name) for name in experts.others]


def test_calibration_statistics_equal_the_references(checkpoints) -> None:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7)]
    got = collect_statistics(VariantBuilder(checkpoints.quantized, dtype="float32"), prompts, batch_size=2)
    expected = collect_statistics(VariantBuilder(checkpoints.reference, dtype="float32"), prompts, batch_size=2)
    assert set(got.router) == set(expected.router) and got.router
    for layer, stats in expected.router.items():
        for name in ("tcess", "logit", "frequency", "reap", "ean", "easy_ep"):
            torch.testing.assert_close(getattr(got.router[layer], name), getattr(stats, name), rtol=1e-5, atol=1e-6)
        assert float(stats.reap.sum()) > 0


def test_dequantized_export_reloads_with_plain_transformers(checkpoints, tmp_path) -> None:
    builder = VariantBuilder(checkpoints.quantized, dtype="float32")
    kept = (0, 3, 4, 7) if builder.family.balanced_groups(builder.config) > 1 else (1, 4, 6)
    selection = Selection("moe_experts", {layer: list(kept) for layer in builder.sparse_layers})
    out = export_variant(builder, selection, tmp_path / "export", keep_quantization=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not any(name.endswith(("_scale_inv", "_blocks", "_scales")) for name in _stored_sizes(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, builder.family.experts_field) == len(kept)
    expected = _logits(VariantBuilder(checkpoints.reference, dtype="float32").build(selection))
    _close(_logits(reloaded), expected)


def test_export_in_the_checkpoint_precision_keeps_the_stored_bytes(checkpoints, tmp_path) -> None:
    """A variant exported with `--dtype auto` keeps the source's quantized bytes and scales of its kept experts,
    bit for bit, and its `quantization_config`; read back, it computes the variant."""
    builder = VariantBuilder(checkpoints.quantized, dtype="float32")
    kept = (0, 3, 4, 7) if builder.family.balanced_groups(builder.config) > 1 else (1, 4, 6)
    selection = Selection("moe_experts", {layer: list(kept) for layer in builder.sparse_layers})
    out = export_variant(builder, selection, tmp_path / "export", keep_quantization=True)
    source_config = json.loads((checkpoints.quantized / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == source_config["quantization_config"]
    exported = load_file(out / "model.safetensors")
    source = load_file(checkpoints.quantized / "model.safetensors")
    quantized = [name for name in source if name.endswith(("_scale_inv", "_blocks", "_scales"))]
    assert quantized
    for name in quantized:
        per_expert = re.search(r"(layers\.(\d+)\..*\.experts\.)(\d+)\.", name)
        if per_expert is None and ".experts." in name:  # fused (gpt-oss): the kept experts' rows, in order
            expected = source[name][list(kept)]
            assert torch.equal(exported[name].view(torch.uint8), expected.view(torch.uint8)), name
        elif per_expert is not None:  # one expert's tensor: exported as its position among the kept
            if int(per_expert.group(3)) in kept:
                renamed = name.replace(
                    per_expert.group(0), f"{per_expert.group(1)}{kept.index(int(per_expert.group(3)))}."
                )
                assert torch.equal(exported[renamed].view(torch.uint8), source[name].view(torch.uint8)), name
        else:  # attention and other quantized backbone tensors: as they are
            assert torch.equal(exported[name].view(torch.uint8), source[name].view(torch.uint8)), name
    expected = _logits(VariantBuilder(checkpoints.reference, dtype="float32").build(selection))
    _close(_logits(VariantBuilder(out, dtype="float32").build()), expected)
    if checkpoints.case.format == "mxfp4":  # the packed experts replace the dequantized ones save_pretrained wrote
        assert not [name for name in exported if name.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
        _close(_logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected)  # transformers dequantizes
