"""Variant equivalence, bytes read and backbone sharing, for every supported family, on tiny random checkpoints.

The reference for a pruned MoE variant is the full model whose router excludes the non-kept experts
from its selection: a forward hook on each router recomputes the routing with those experts' logits
(DeepSeek-V3: selection scores) set to -inf, written here from the architecture's routing rule.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pattern_store.selection import Selection, SelectionError
from server.model.checkpoint import CheckpointReader
from server.model.families import UnsupportedModelError, family_for
from server.model.layout import ModelLayout
from server.model.masking import RouterMasks
from server.model.variant import VariantBuilder

from conftest import DEMO_MOE, DEMO_MOE_FINE
from tiny_models import dense_configs, moe_configs, save_random_model

MOE = sorted(moe_configs())
DENSE = sorted(dense_configs())
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: save_random_model(config, root / name) for name, config in {**moe_configs(), **dense_configs()}.items()
    }


def _full(directory: Path):
    """The reference model, its weights copied out of the checkpoint's mmap: BLAS rounds a product with a
    weight at an unaligned address (a small tensor in the file) differently from the same weight in fresh
    memory, where every variant keeps its tensors."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    return model


def _inputs(seed: int = 1, batch: int = 3, length: int = 11) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _deepseek_v3_rule(module, hidden, excluded):
    """Sigmoid scores; the selection bias and the groups (scored by their two best) decide; the scores weigh."""
    logits = F.linear(hidden.float(), module.weight.float())
    scores = logits.sigmoid()
    choice = scores + module.e_score_correction_bias + excluded
    groups = choice.view(-1, module.num_group, module.num_experts // module.num_group)
    group_scores = groups.topk(2, dim=-1).values.sum(-1)
    picked = group_scores.topk(module.topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, picked, 1.0).bool()
    allowed = group_mask.unsqueeze(-1).expand_as(groups).reshape(choice.shape)
    index = choice.masked_fill(~allowed, float("-inf")).topk(module.top_k, dim=-1).indices
    weights = scores.gather(1, index)
    if module.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return logits, weights * module.routed_scaling_factor, index


def _deepseek_v2_rule(module, hidden, excluded):
    """Softmax over the selectable experts; groups scored by their best probability; no normalisation."""
    logits = F.linear(hidden.float(), module.weight.float())
    probs = torch.softmax(logits + excluded, dim=-1)
    per_group = module.num_experts // module.num_group
    best = torch.stack([probs[:, g * per_group : (g + 1) * per_group].amax(-1) for g in range(module.num_group)], -1)
    picked = best.topk(module.topk_group, dim=-1).indices  # [T, topk_group]
    allowed = torch.zeros_like(probs, dtype=torch.bool)
    for g in range(module.num_group):
        chosen = (picked == g).any(-1, keepdim=True)
        allowed[:, g * per_group : (g + 1) * per_group] = chosen
    weights, index = probs.where(allowed, torch.zeros_like(probs)).topk(module.top_k, dim=-1)
    return logits, weights * module.routed_scaling_factor, index


def _ernie_rule(module, hidden, excluded):
    """Softmax probabilities; the selection bias is added to them to choose; the chosen are normalised."""
    logits = F.linear(hidden.float(), module.weight.float())
    probs = torch.softmax(logits + excluded, dim=-1)
    bias = module.moe_statics.e_score_correction_bias[0]
    index = (probs + bias + excluded).topk(module.top_k, dim=-1).indices
    weights = probs.gather(1, index)
    return logits, weights / weights.sum(-1, keepdim=True).clamp(min=module.norm_min), index


def _top_logits_rule(module, hidden, excluded):
    """Granite and gpt-oss: the top-k logits (gpt-oss's with the router bias), softmax over those k only."""
    logits = F.linear(hidden, module.weight, getattr(module, "bias", None)).float()
    values, index = (logits + excluded).topk(module.top_k, dim=-1)
    return logits, torch.softmax(values, dim=-1), index


def _minimax_m2_rule(module, hidden, excluded, bias):
    """Sigmoid scores; the block's selection bias decides; the chosen scores are normalised."""
    logits = F.linear(hidden, module.weight)
    scores = logits.float().sigmoid()
    index = (scores + bias + excluded).topk(module.top_k, dim=-1).indices
    weights = scores.gather(1, index)
    return logits, weights / weights.sum(-1, keepdim=True), index


def _sparsemixer_rule(module, hidden, kept):
    """PhiMoE at inference, written over the kept experts' logits only: the best expert, weighted by the
    softmax over the experts within the jitter threshold of it; then the same among the rest."""
    logits = F.linear(hidden, module.weight)
    scores = logits[:, list(kept)]
    eps = module.router_jitter_noise
    picks, weights = [], []
    remaining = torch.ones_like(scores, dtype=torch.bool)
    for _ in range(2):
        best, position = scores.masked_fill(~remaining, float("-inf")).max(-1, keepdim=True)
        near = remaining & ((best - scores) / scores.abs().clamp(min=best) <= 2 * eps)
        share = torch.softmax(scores.masked_fill(~near, float("-inf")), dim=-1)
        picks.append(position)
        weights.append(share.gather(1, position))
        remaining = remaining.scatter(1, position, False)
    index = torch.tensor(list(kept))[torch.cat(picks, -1)]
    return logits, torch.cat(weights, -1), index


def _softmax_rule(module, hidden, excluded):
    """Softmax over the selectable experts, top-k, normalised where the model does (Mixtral, Hunyuan always)."""
    weight = module.wg.weight if hasattr(module, "wg") else module.weight
    logits = F.linear(hidden.to(weight.dtype), weight)
    probs = torch.softmax((logits + excluded).float(), dim=-1)
    weights, index = probs.topk(module.top_k, dim=-1)
    if getattr(module, "norm_topk_prob", True):
        weights = weights / weights.sum(-1, keepdim=True)
    return logits, weights.to(logits.dtype), index


_DEEPSEEK_V3_LIKE = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe")


def _masked_routing(module: torch.nn.Module, args, kept: Sequence[int], model_type: str):
    """The router's own rule, with the experts outside `kept` unselectable."""
    experts = int(module.num_experts)
    hidden = args[0].reshape(-1, args[0].shape[-1])
    excluded = torch.full((experts,), float("-inf"))
    excluded[list(kept)] = 0.0
    if model_type in _DEEPSEEK_V3_LIKE:
        return _deepseek_v3_rule(module, hidden, excluded)
    if model_type == "deepseek_v2":
        return _deepseek_v2_rule(module, hidden, excluded)
    if model_type == "ernie4_5_moe":
        return _ernie_rule(module, hidden, excluded)
    if model_type in ("granitemoe", "granitemoeshared", "gpt_oss"):
        return _top_logits_rule(module, hidden, excluded)
    if model_type == "minimax_m2":
        return _minimax_m2_rule(module, hidden, excluded, args[1])
    if model_type == "phimoe":
        return _sparsemixer_rule(module, hidden, kept)
    return _softmax_rule(module, hidden, excluded)


def _block(model, layer: int) -> torch.nn.Module:
    """The MoE block of decoder layer `layer` (`mlp` in most families, `block_sparse_moe` in Granite)."""
    decoder = model.model.layers[layer]
    return decoder.block_sparse_moe if hasattr(decoder, "block_sparse_moe") else decoder.mlp


def _router(block: torch.nn.Module) -> torch.nn.Module:
    return block.router if hasattr(block, "router") else block.gate


@contextmanager
def masked(model, selection: Selection) -> Iterator[None]:
    model_type = model.config.model_type
    handles = []
    for layer, kept in selection.layers.items():
        router = _router(_block(model, layer))

        def hook(module, args, output, kept=kept):
            return _masked_routing(module, args, kept, model_type)

        handles.append(router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@functools.cache
def _sparse(model_type: str) -> list[int]:
    """The sparse layers of a tiny model: those whose block has an experts module."""
    config = moe_configs()[model_type]
    return sorted(ModelLayout(config, family_for(model_type)).sparse_layers)


def _grouped(model_type: str) -> bool:
    return family_for(model_type).balanced_groups(moe_configs()[model_type]) > 1


def _selections(model_type: str) -> list[Selection]:
    layers = _sparse(model_type)
    if _grouped(model_type):  # two groups of four experts: keep the same number in each
        shapes = [[2, 3, 4, 5], [0, 3, 6, 7], [0, 1, 2, 4, 5, 6]]
    else:
        shapes = [[6, 7], [0, 2, 3], [1, 2, 3, 4, 5, 6, 7]]  # highest-numbered only, top-k + 1, all but one
    uneven = Selection("moe_experts", {layer: shapes[i % len(shapes)] for i, layer in enumerate(layers)})
    same = Selection("moe_experts", {layer: shapes[0] for layer in layers})
    return [uneven, same]


@pytest.mark.parametrize("model_type", MOE + DENSE)
def test_keep_all_reproduces_the_full_model(checkpoints, model_type) -> None:
    full = _full(checkpoints[model_type])
    variant = VariantBuilder(checkpoints[model_type]).build()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(full(x).logits, variant(x).logits)


@pytest.mark.parametrize("model_type", MOE)
def test_pruned_variant_equals_masked_full_model(checkpoints, model_type) -> None:
    full = _full(checkpoints[model_type])
    builder = VariantBuilder(checkpoints[model_type])
    x = _inputs()
    for selection in _selections(model_type):
        variant = builder.build(selection)
        with torch.no_grad(), masked(full, selection):
            reference = full(x).logits
        with torch.no_grad():
            unmasked = full(x).logits
            logits = variant(x).logits
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, unmasked, atol=1e-4), "pruning should change something"
        for layer, kept in selection.layers.items():
            assert _block(variant, layer).experts.gate_up_proj.shape[0] == len(kept)


@pytest.mark.parametrize("model_type", MOE)
def test_router_masks_on_the_full_model_equal_the_built_variant(checkpoints, model_type) -> None:
    """Refinement scores selections with masks on one full model instead of building each variant: the masked
    model must compute the variant's logits, and a selection outside the routing rule must be refused."""
    builder = VariantBuilder(checkpoints[model_type])
    full = builder.build()
    masks = RouterMasks(full, builder.family, builder.config, {i: s.prefix for i, s in builder.sparse_layers.items()})
    x = _inputs()
    with torch.no_grad():
        unmasked = full(x).logits
        for selection in _selections(model_type):
            masks.apply(selection.layers)
            with masks:
                got = full(x).logits
            torch.testing.assert_close(got, builder.build(selection)(x).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(full(x).logits, unmasked), "leaving the context removes the masks"
    if _grouped(model_type):
        with pytest.raises(SelectionError, match="same number"):
            masks.apply({_sparse(model_type)[0]: [0, 1, 2, 4]})


@pytest.mark.parametrize("directory", [DEMO_MOE, DEMO_MOE_FINE], ids=["demo-moe", "demo-moe-fine"])
def test_committed_demo_shapes_keep_the_contract(directory) -> None:
    """The demo MoE models as committed: keeping everything is the full model bit for bit, and a pruned
    variant (half the experts, different ones per layer) is the masked full model."""
    full = _full(directory)
    builder = VariantBuilder(directory)
    x = _inputs(seed=7, batch=2, length=20).clamp(3, builder.config.vocab_size - 1)
    experts = next(iter(builder.sparse_layers.values())).num_experts
    selection = Selection("moe_experts", {layer: list(range(layer % 2, experts, 2)) for layer in builder.sparse_layers})
    with torch.no_grad():
        assert torch.equal(full(x).logits, builder.build()(x).logits)
        with masked(full, selection):
            reference = full(x).logits
        torch.testing.assert_close(builder.build(selection)(x).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MOE)
def test_expert_order_matters(checkpoints, model_type) -> None:
    """A builder that put the wrong expert behind a router row would fail this: swap two kept experts' weights."""
    builder = VariantBuilder(checkpoints[model_type])
    selection = _selections(model_type)[1]
    variant = builder.build(selection)
    x = _inputs()
    with torch.no_grad():
        before = variant(x).logits
        experts = _block(variant, _sparse(model_type)[-1]).experts
        experts.gate_up_proj.data = experts.gate_up_proj.data[[1, 0, *range(2, experts.gate_up_proj.shape[0])]]
        after = variant(x).logits
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("model_type", MOE)
def test_greedy_generation_with_kv_cache_matches(checkpoints, model_type) -> None:
    full = _full(checkpoints[model_type])
    selection = _selections(model_type)[0]
    variant = VariantBuilder(checkpoints[model_type]).build(selection)
    x = _inputs(seed=3, batch=1, length=6)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), masked(full, selection):
        reference = full.generate(x, **settings)
    produced = variant.generate(x, **settings)
    assert produced.shape[1] == x.shape[1] + 12
    assert torch.equal(produced, reference)


_FUSED_EXPERTS = re.compile(
    r"(experts\.(gate_up_proj|down_proj)(_bias)?|block_sparse_moe\.(input_linear|output_linear)\.weight)$"
)
_ROUTER = re.compile(
    r"(mlp|block_sparse_moe)\.(gate\.weight|gate\.wg\.weight|router\.weight|router\.bias|router\.layer\.weight"
    r"|(gate\.|moe_statics\.)?e_score_correction_bias)$"
)


def _expected_bytes(reader: CheckpointReader, selection: Selection) -> tuple[int, int]:
    """(backbone bytes, bytes of the kept experts and their router slices) from the checkpoint's index, in
    whatever layout the checkpoint stores them: one tensor per expert, or fused [E, ...] tensors."""
    backbone = variant = 0
    for name in reader.names:
        if name.startswith("model.visual."):
            continue  # a multimodal release's vision tower: never read for the text model
        info = reader.info(name)
        match = _EXPERT.search(name)
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1)) if "layers." in name else -1
        kept = selection.kept(layer)
        if match:
            if kept is None or int(match.group(1)) in kept:
                variant += info.nbytes
        elif _FUSED_EXPERTS.search(name) or _ROUTER.search(name):
            experts = info.shape[1] if info.shape[0] == 1 else info.shape[0]  # ERNIE's selection bias is [1, E]
            variant += info.nbytes if kept is None else info.nbytes * len(kept) // experts
        else:
            backbone += info.nbytes
    return backbone, variant


@pytest.mark.parametrize("model_type", MOE)
def test_bytes_read_are_backbone_plus_kept_experts(checkpoints, model_type) -> None:
    builder = VariantBuilder(checkpoints[model_type])
    first, second = _selections(model_type)
    backbone, first_experts = _expected_bytes(builder.reader, first)
    builder.build(first)
    assert builder.reader.bytes_read == backbone + first_experts
    assert builder.reader.bytes_read < builder.reader.total_bytes
    _, second_experts = _expected_bytes(builder.reader, second)
    builder.build(second)
    assert builder.reader.bytes_read == backbone + first_experts + second_experts


@pytest.mark.parametrize("model_type", ["qwen2_moe", "llama"])
def test_variants_share_backbone_storage(checkpoints, model_type) -> None:
    builder = VariantBuilder(checkpoints[model_type])
    if model_type == "qwen2_moe":
        a, b = (builder.build(s) for s in _selections(model_type))
    else:
        a, b = builder.build(Selection("dense_channels", {0: [1, 2, 3]})), builder.build()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert a.get_parameter(name).data_ptr() == b.get_parameter(name).data_ptr(), name
    if model_type == "qwen2_moe":  # shared experts are backbone too; routed experts are not
        shared = "model.layers.0.mlp.shared_expert.gate_proj.weight"
        assert a.get_parameter(shared).data_ptr() == b.get_parameter(shared).data_ptr()
        routed = "model.layers.0.mlp.experts.gate_up_proj"
        assert a.get_parameter(routed).data_ptr() != b.get_parameter(routed).data_ptr()


def test_tied_embeddings_stay_tied(tmp_path) -> None:
    config = moe_configs()["qwen3_moe"]
    config.tie_word_embeddings = True
    directory = save_random_model(config, tmp_path / "tied")
    builder = VariantBuilder(directory)
    variant = builder.build(Selection("moe_experts", {0: [0, 1, 2]}))
    assert variant.lm_head.weight is variant.model.embed_tokens.weight
    assert "lm_head.weight" not in builder.reader
    with torch.no_grad():
        assert torch.equal(builder.build()(_inputs()).logits, _full(directory)(_inputs()).logits)


def test_uniform_selection_reduces_the_config_expert_count(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["mixtral"])
    variant = builder.build(Selection("moe_experts", {0: [0, 1, 2], 1: [3, 4, 5], 2: [5, 6, 7]}))
    assert variant.config.num_local_experts == 3
    assert builder.config.num_local_experts == 8, "the builder's own config is untouched"


# -- dense channels ---------------------------------------------------------------------------------


def _channel_selection() -> tuple[Selection, dict[int, torch.Tensor]]:
    """Keep uneven channel sets; with a bias, also return the mean activations used for the compensation."""
    kept = {0: list(range(0, 64, 2)), 2: [*range(40, 64), 3, 9]}
    means = {layer: torch.linspace(-0.5, 0.7, 64) * (layer + 1) for layer in kept}
    return Selection("dense_channels", kept), means


@pytest.mark.parametrize("model_type", DENSE)
def test_dense_bias_compensation_equals_mean_replacement(checkpoints, model_type) -> None:
    """Pruned channels replaced by their mean activation in the full model == the variant with SEAP's bias."""
    full = _full(checkpoints[model_type])
    plain, means = _channel_selection()
    bias = {}
    for layer, kept in plain.layers.items():
        pruned = sorted(set(range(64)) - set(kept))
        down = full.model.layers[layer].mlp.down_proj.weight.detach()
        bias[layer] = (down[:, pruned] @ means[layer][pruned]).tolist()
    selection = Selection("dense_channels", plain.layers, bias)
    handles = []
    for layer, kept in plain.layers.items():
        pruned = sorted(set(range(64)) - set(kept))

        def replace(module, args, pruned=pruned, mean=means[layer]):
            (activation,) = args
            activation = activation.clone()
            activation[..., pruned] = mean[pruned].to(activation.dtype)
            return (activation,)

        handles.append(full.model.layers[layer].mlp.down_proj.register_forward_pre_hook(replace))
    x = _inputs()
    with torch.no_grad():
        reference = full(x).logits
        for handle in handles:
            handle.remove()
        unpruned = full(x).logits
    variant = VariantBuilder(checkpoints[model_type]).build(selection)
    with torch.no_grad():
        logits = variant(x).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, unpruned, atol=1e-4)
    assert variant.model.layers[0].mlp.gate_proj.weight.shape[0] == 32
    assert variant.model.layers[2].mlp.down_proj.weight.shape[1] == 26


@pytest.mark.parametrize("model_type", DENSE)
def test_dense_pruning_reads_only_kept_channels(checkpoints, model_type) -> None:
    builder = VariantBuilder(checkpoints[model_type])
    selection, _ = _channel_selection()
    builder.build(selection)
    reader = builder.reader
    saved = 0
    for layer, kept in selection.layers.items():
        for projection in ("gate_proj", "up_proj", "down_proj"):
            info = reader.info(f"model.layers.{layer}.mlp.{projection}.weight")
            saved += info.nbytes * (64 - len(kept)) // 64
        if f"model.layers.{layer}.mlp.gate_proj.bias" in reader:  # Llama with mlp_bias: gate/up biases by channel
            saved += 2 * reader.info(f"model.layers.{layer}.mlp.gate_proj.bias").nbytes * (64 - len(kept)) // 64
    assert reader.bytes_read == reader.total_bytes - saved


# -- errors -----------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported_families() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Mixtral.*DeepSeek-V3.*Llama"):
        family_for("gpt2")


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({1: [0, 1, 2]}, "no routed experts"),  # qwen3_moe layer 1 is in mlp_only_layers
        ({0: [3]}, "fewer than the top-2"),
        ({0: [0, 8]}, "does not exist"),
    ],
)
def test_bad_selections_are_clear_errors(checkpoints, layers, message) -> None:
    with pytest.raises(SelectionError, match=message):
        VariantBuilder(checkpoints["qwen3_moe"]).build(Selection("moe_experts", layers))


def test_deepseek_unbalanced_groups_are_a_clear_error(checkpoints) -> None:
    with pytest.raises(SelectionError, match="every group"):
        VariantBuilder(checkpoints["deepseek_v3"]).build(Selection("moe_experts", {1: [0, 1, 2, 5]}))


def test_wrong_selection_kind_is_a_clear_error(checkpoints) -> None:
    with pytest.raises(SelectionError, match="dense_channels"):
        VariantBuilder(checkpoints["llama"]).build(Selection("moe_experts", {0: [0, 1]}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_variant_built_straight_into_gpu_memory_in_bf16(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["qwen3_moe"], device="cuda", dtype="bfloat16")
    selection = _selections("qwen3_moe")[0]
    variant = builder.build(selection)
    for name, tensor in [*variant.named_parameters(), *variant.named_buffers()]:
        assert tensor.device.type == "cuda", name
        if tensor.is_floating_point() and not name.endswith("inv_freq"):
            assert tensor.dtype == torch.bfloat16, name
    reference = VariantBuilder(checkpoints["qwen3_moe"], dtype="float32").build(selection)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(variant(x.cuda()).logits.float().cpu(), reference(x).logits, rtol=0.05, atol=0.05)


def test_fused_expert_checkpoints_read_only_kept_experts(checkpoints, tmp_path) -> None:
    """Checkpoints that store experts as fused [E, ...] tensors (transformers v5's own layout) work too."""
    from safetensors.torch import save_file

    source = checkpoints["qwen2_moe"]
    full = _full(source)
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    full.config.save_pretrained(fused_dir)
    state = {name: tensor.contiguous() for name, tensor in full.state_dict().items()}
    save_file(state, str(fused_dir / "model.safetensors"))
    reader = CheckpointReader(fused_dir)
    assert "model.layers.0.mlp.experts.gate_up_proj" in reader
    selection = Selection("moe_experts", {0: [0, 1, 2, 6], 1: [3, 5], 2: [7, 1]})
    fused = VariantBuilder(fused_dir)
    variant = fused.build(selection)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(variant(x).logits, VariantBuilder(source).build(selection)(x).logits)
    expert_bytes = 0
    for layer, kept in selection.layers.items():
        for name in ("gate_up_proj", "down_proj"):
            info = reader.info(f"model.layers.{layer}.mlp.experts.{name}")
            expert_bytes += info.nbytes * (info.shape[0] - len(kept)) // info.shape[0]
        router = reader.info(f"model.layers.{layer}.mlp.gate.weight")
        expert_bytes += router.nbytes * (router.shape[0] - len(kept)) // router.shape[0]
    assert fused.reader.bytes_read == fused.reader.total_bytes - expert_bytes


def test_variant_tensors_do_not_point_into_the_checkpoint_mmap(checkpoints) -> None:
    builder = VariantBuilder(checkpoints["llama"])
    variant = builder.build()
    mapped = builder.reader.read("model.embed_tokens.weight")
    owned = variant.model.embed_tokens.weight
    assert torch.equal(mapped, owned) and mapped.data_ptr() != owned.data_ptr()


def _owned_bytes(model: torch.nn.Module, other: torch.nn.Module) -> int:
    """Bytes `model` holds in storage that `other`, built by the same builder, does not share: what the
    variant owns beyond the shared backbone (measured, not computed)."""
    shared = {tensor.untyped_storage().data_ptr() for tensor in [*other.parameters(), *other.buffers()]}
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in shared or pointer in seen or tensor.is_meta:
            continue
        seen.add(pointer)
        total += tensor.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("model_type", MOE + DENSE)
def test_variant_bytes_computed_before_building_equal_what_the_build_holds(checkpoints, model_type) -> None:
    """The cache admits a variant by `variant_bytes` before reading anything; it must be what the build
    really allocates beyond the backbone, or the budget is a fiction."""
    builder = VariantBuilder(checkpoints[model_type])
    if builder.family.kind == "moe":
        pruned = _selections(model_type)[1]
    else:
        layers = {index: list(range(0, layer.intermediate, 3)) for index, layer in builder.dense_layers.items()}
        bias = {index: [0.0] * builder.config.hidden_size for index in list(layers)[:1]}
        pruned = Selection("dense_channels", layers, bias)
    for selection in (None, pruned):
        model = builder.build(selection)
        assert builder.variant_bytes(selection) == _owned_bytes(model, builder.build()) > 0
    assert builder.variant_bytes(pruned) != builder.variant_bytes(None)
