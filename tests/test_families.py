"""The family table against the installed transformers: every MoE model type is served or listed with a reason,
and each supported family's adapter works where its contract tests do not look (local refinement's router)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from pattern_store.selection import Selection
from server.model.families import FAMILIES, UNSUPPORTED_MOE, family_for
from server.model.layer_stream import LayerStream
from server.model.local_refinement import BlockCapture, BlockReconstruction
from server.model.variant import VariantBuilder

from tiny_models import moe_configs, save_random_model

#: config fields that count routed experts, in every naming transformers uses
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
SUPPORTED_MOE = {model_type for family in FAMILIES if family.kind == "moe" for model_type in family.model_types}


def _class_fields(config_class: type) -> set[str]:
    """Field names a config class declares (dataclass fields, annotations, attribute_map aliases)."""
    names: set[str] = set(getattr(config_class, "attribute_map", {}) or {})
    for klass in config_class.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
        if dataclasses.is_dataclass(klass):
            names |= {f.name for f in dataclasses.fields(klass)}
    return names


def _counts_experts(config: Any, depth: int = 0) -> bool:
    """Whether a config (or a sub-config of it: a multimodal model's text config) counts routed experts."""
    for name in EXPERT_COUNT_FIELDS:
        try:
            value = getattr(config, name, None)
        except Exception:  # an aliased field some configs cannot resolve
            value = None
        if value is not None and not isinstance(value, bool):
            return True
    if depth < 2:
        return any(
            _counts_experts(value, depth + 1) for value in vars(config).values() if isinstance(value, PretrainedConfig)
        )
    return False


def _is_moe(model_type: str) -> bool:
    """A model type is MoE when its config counts experts: read from a default instance where one can be built,
    else from the fields its class (and its sub-config classes) declares."""
    config_class = CONFIG_MAPPING[model_type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _counts_experts(config_class())
    except Exception:  # some configs cannot be built without arguments
        classes = [config_class, *(getattr(config_class, "sub_configs", {}) or {}).values()]
        return any(set(EXPERT_COUNT_FIELDS) & _class_fields(klass) for klass in classes if isinstance(klass, type))


@pytest.fixture(scope="module")
def moe_model_types() -> set[str]:
    return {model_type for model_type in CONFIG_MAPPING_NAMES if _is_moe(model_type)}


def test_every_moe_model_type_is_supported_or_listed_with_a_reason(moe_model_types) -> None:
    """A transformers upgrade that adds a MoE model type fails here until it is served or listed."""
    assert {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"} <= moe_model_types, "the classification finds MoE"
    assert not {"llama", "qwen3", "gpt2"} & moe_model_types, "and only MoE"
    unknown = sorted(moe_model_types - SUPPORTED_MOE - set(UNSUPPORTED_MOE))
    assert not unknown, f"MoE model types neither supported nor in UNSUPPORTED_MOE with a reason: {unknown}"


def test_the_unsupported_list_is_current_and_disjoint(moe_model_types) -> None:
    stale = sorted(set(UNSUPPORTED_MOE) - moe_model_types)
    assert not stale, f"UNSUPPORTED_MOE names types the installed transformers does not have as MoE: {stale}"
    assert not SUPPORTED_MOE & set(UNSUPPORTED_MOE), "a type is both supported and listed as unsupported"
    assert all(len(reason) > 20 for reason in UNSUPPORTED_MOE.values())


def test_supported_families_say_what_they_serve() -> None:
    """The README's table is rendered from these: hub models, formats and routing notes for every MoE family."""
    for family in FAMILIES:
        if family.kind != "moe":
            continue
        assert family.hub_models and all("/" in model for model in family.hub_models), family.name
        assert family.formats and set(family.formats) <= {"bf16", "fp8-block", "mxfp4"}, family.name
        assert family.routing_notes, family.name
        assert family.experts_layout in ("gate_up_rows", "transposed"), family.name
        assert family.router_tensors[0].path.endswith("weight"), "the router's weight comes first"
    assert set(moe_configs()) == SUPPORTED_MOE, "every supported MoE type has a tiny checkpoint (contract tests)"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-families")
    return {name: save_random_model(config, root / name) for name, config in moe_configs().items()}


@pytest.mark.parametrize("model_type", sorted(moe_configs()))
def test_local_refinement_scores_a_selection_as_its_variant_computes(checkpoints, model_type) -> None:
    """Layer-local refinement's error of a kept set (the block's router restricted, every expert's output
    cached) equals the error of the built variant's routed experts on the same inputs."""
    builder = VariantBuilder(checkpoints[model_type])
    family = family_for(model_type)
    layer = max(builder.sparse_layers)
    sparse = builder.sparse_layers[layer]
    full = builder.build()
    stream = LayerStream(full, [[3 + (7 * i + 5 * j) % 60 for j in range(9)] for i in range(3)], batch_size=3)
    for index in range(layer):
        stream.run_layer(index)
    block = full.get_submodule(sparse.prefix)
    with BlockCapture(block, stream) as capture:
        stream.run_layer(layer)
    x, y = capture.sample(1000, seed=0)
    reconstruction = BlockReconstruction(block, family, builder.config, layer, x, y)
    kept = (0, 3, 4, 7) if family.balanced_groups(builder.config) > 1 else (1, 2, 6)
    variant_block = builder.build(Selection("moe_experts", {layer: list(kept)})).get_submodule(sparse.prefix)
    routed: list[torch.Tensor] = []
    handle = variant_block.experts.register_forward_hook(lambda module, args, output: routed.append(output))
    with torch.no_grad():
        variant_block(x[None])
    handle.remove()
    expected = float((routed[0].reshape(y.shape).float() - y.float()).square().sum() / y.float().square().sum())
    assert reconstruction.error(tuple(range(sparse.num_experts))) < 1e-10
    assert expected > 1e-4, "pruning must change the routed output"
    assert reconstruction.error(kept) == pytest.approx(expected, rel=1e-4, abs=1e-9)
