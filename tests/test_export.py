"""`taskmoe export`: the variant as a standard checkpoint that plain transformers reloads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pattern_store.selection import Selection
from server.cli import main
from server.model.export import ExportError, export_variant
from server.model.families import family_for
from server.model.layout import ModelLayout
from server.model.variant import VariantBuilder

from tiny_models import dense_configs, moe_configs, save_random_model

X = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _uniform(model_type: str) -> Selection:
    config = moe_configs()[model_type]
    family = family_for(model_type)
    layers = sorted(ModelLayout(config, family).sparse_layers)
    kept = [0, 3, 4, 7] if family.balanced_groups(config) > 1 else [1, 4, 6]  # grouped: two of each group
    return Selection("moe_experts", dict.fromkeys(layers, kept))


@pytest.mark.parametrize("model_type", sorted(moe_configs()))
def test_exported_moe_reloads_with_plain_transformers(tmp_path, model_type) -> None:
    source = save_random_model(moe_configs()[model_type], tmp_path / "full")
    builder = VariantBuilder(source)
    selection = _uniform(model_type)
    out = export_variant(builder, selection, tmp_path / "variant")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    config = AutoConfig.from_pretrained(out)
    expected = len(next(iter(selection.layers.values())))
    assert getattr(config, builder.family.experts_field) == expected
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X).logits, builder.build(selection)(X).logits, rtol=1e-5, atol=1e-5)
    exported = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert exported < sum(p.stat().st_size for p in source.glob("*.safetensors"))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_exported_dense_with_uneven_widths_is_faithful(tmp_path, model_type) -> None:
    source = save_random_model(dense_configs()[model_type], tmp_path / "full")
    builder = VariantBuilder(source)
    selection = Selection("dense_channels", {0: list(range(20)), 1: list(range(10, 50))})
    out = export_variant(builder, selection, tmp_path / "variant")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoConfig.from_pretrained(out).intermediate_size == 64  # layer 2 keeps all 64 channels
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X).logits, builder.build(selection)(X).logits, rtol=1e-5, atol=1e-5)


def test_exported_dense_bias_needs_mlp_bias(tmp_path) -> None:
    bias = {0: [0.01 * i for i in range(32)]}
    selection = Selection("dense_channels", {0: list(range(32)), 1: list(range(32)), 2: list(range(32))}, bias)
    llama = VariantBuilder(save_random_model(dense_configs()["llama"], tmp_path / "llama"))
    out = export_variant(llama, selection, tmp_path / "llama-variant")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoConfig.from_pretrained(out).intermediate_size == 32
    assert llama.config.intermediate_size == 64, "the builder's own config is untouched"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X).logits, llama.build(selection)(X).logits, rtol=1e-5, atol=1e-5)
    qwen3 = VariantBuilder(save_random_model(dense_configs()["qwen3"], tmp_path / "qwen3"))
    with pytest.raises(ExportError, match="bias"):
        export_variant(qwen3, selection, tmp_path / "qwen3-variant")


def test_uneven_moe_export_is_a_clear_error(tmp_path) -> None:
    builder = VariantBuilder(save_random_model(moe_configs()["olmoe"], tmp_path / "full"))
    with pytest.raises(ExportError, match="same number of kept experts"):
        export_variant(builder, Selection("moe_experts", {0: [0, 1]}), tmp_path / "out")


def test_cli_export(tmp_path, capsys) -> None:
    source = save_random_model(moe_configs()["mixtral"], tmp_path / "full")
    (source / "tokenizer_config.json").write_text("{}")
    selection_file = tmp_path / "selection.json"
    selection_file.write_text(json.dumps({"kind": "moe_experts", "layers": {"0": [0, 1], "1": [2, 3], "2": [4, 5]}}))
    out = tmp_path / "out"
    assert main(["export", "--model", str(source), "--selection", str(selection_file), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(out).num_local_experts == 2
    assert (out / "tokenizer_config.json").is_file()
    assert main(["export", "--model", str(source), "--selection", str(selection_file), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not JSON"),
        ('{"kind": "moe_experts"}', "lacks layers"),
        ('{"kind": "experts", "layers": {}}', "unknown selection kind"),
        ('{"kind": "moe_experts", "layers": {"0": [1, -2]}}', "non-negative"),
        ('{"kind": "moe_experts", "layers": {"x": [1]}}', "not an integer"),
        ('{"kind": "moe_experts", "layers": {"0": [0, 1, 99]}}', "does not exist"),
    ],
)
def test_cli_export_bad_selection_is_one_line(tmp_path, capsys, document, message) -> None:
    source = save_random_model(moe_configs()["olmoe"], tmp_path / "full")
    selection_file = tmp_path / "selection.json"
    selection_file.write_text(document)
    assert (
        main(["export", "--model", str(source), "--selection", str(selection_file), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_export_never_overwrites_the_source_model(tmp_path, capsys) -> None:
    source = save_random_model(moe_configs()["olmoe"], tmp_path / "full")
    selection_file = tmp_path / "selection.json"
    selection_file.write_text(json.dumps({"kind": "moe_experts", "layers": {"0": [0, 1]}}))
    args = ["export", "--model", str(source), "--selection", str(selection_file), "--force"]
    assert main([*args, "--out", str(source)]) == 2
    assert "model directory itself" in capsys.readouterr().err
    assert main([*args, "--out", str(selection_file)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_export_of_a_stored_pattern(tmp_path, capsys) -> None:
    from pattern_store.store import PatternStore

    from conftest import DEMO_MOE

    store = DEMO_MOE / "patterns"
    patterns = PatternStore(store, create=False)
    # the demo stores' budget is moved by the answer loss: most patterns keep different counts in different layers
    shapes = {name: {len(kept) for kept in patterns.get(name).selection.layers.values()} for name in patterns.names()}
    uniform = next(name for name, counts in shapes.items() if len(counts) == 1)
    moved = next(name for name, counts in shapes.items() if len(counts) > 1)
    out = tmp_path / uniform
    assert (
        main(["export", "--model", str(DEMO_MOE), "--pattern", uniform, "--store", str(store), "--out", str(out)]) == 0
    )
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.num_experts == len(patterns.get(uniform).selection.kept(0))
    args = ["export", "--model", str(DEMO_MOE), "--pattern", moved, "--store", str(store), "--out", str(tmp_path / "m")]
    capsys.readouterr()
    assert main(args) == 2
    assert "same number of kept experts in every sparse layer" in capsys.readouterr().err
    assert (
        main(["export", "--model", str(DEMO_MOE), "--pattern", "nope", "--store", str(store), "--out", str(out)]) == 2
    )
    assert main(["export", "--model", str(DEMO_MOE), "--out", str(tmp_path / "x")]) == 2  # neither given
