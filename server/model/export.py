"""Writing a variant as a standard transformers checkpoint, so vLLM, SGLang or plain
`AutoModelForCausalLM.from_pretrained` can serve it.

MoE variants need the same number of kept experts in every sparse layer: a standard config has one
expert count. Dense variants whose layers keep different numbers of channels are written as a faithful
equivalent: every MLP is padded to the widest kept width with all-zero channels, which contribute
exactly nothing (act(0 * x) * (0 * x) = 0). A SEAP bias compensation needs a config that gives
`down_proj` a bias (Llama's `mlp_bias`); where the family has none, export says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from pattern_store.selection import Selection
from server.model.masking import router_of
from server.model.quantized_export import finish_quantized_export
from server.model.variant import VariantBuilder

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


class ExportError(ValueError):
    """A variant that a standard checkpoint of its family cannot express."""


def _pad_dense(model: PreTrainedModel, builder: VariantBuilder, selection: Selection) -> None:
    """Give every MLP the same width (zero channels added) and, with a bias, Llama's `mlp_bias` layout."""
    width = max(
        len(selection.kept(i)) if selection.kept(i) else layer.intermediate for i, layer in builder.dense_layers.items()
    )
    needs_bias = bool(selection.bias)
    if needs_bias and not hasattr(model.config, "mlp_bias"):
        raise ExportError(
            f"{builder.family.name} configs cannot give down_proj a bias, so the SEAP bias compensation of this "
            "selection has no standard form; export the selection without its bias, or serve it with taskmoe"
        )
    for layer in builder.dense_layers.values():
        mlp = model.get_submodule(layer.prefix)
        for projection in ("gate_proj", "up_proj", "down_proj"):
            linear: nn.Linear = getattr(mlp, projection)
            weight = linear.weight.detach()
            dim = 1 if projection == "down_proj" else 0
            missing = width - weight.shape[dim]
            if missing:
                pad_shape = list(weight.shape)
                pad_shape[dim] = missing
                weight = torch.cat([weight, weight.new_zeros(pad_shape)], dim=dim)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
            if needs_bias or linear.bias is not None:  # padded channels get a zero bias, so they stay silent
                bias = weight.new_zeros(linear.out_features)
                if linear.bias is not None:
                    bias[: linear.bias.shape[0]] = linear.bias.detach()
                linear.bias = nn.Parameter(bias, requires_grad=False)
    model.config.intermediate_size = width
    if needs_bias:
        model.config.mlp_bias = True


def export_variant(
    builder: VariantBuilder, selection: Selection, out: str | Path, keep_quantization: bool = True
) -> Path:
    """Build the variant of `selection` and write it, with the tokenizer files, into `out`. A quantized
    checkpoint's variant keeps its precision unless `keep_quantization` is False (then it is dequantized)."""
    out = Path(out)
    if selection.novices:
        raise ExportError(
            "the selection answers its pruned experts' choices by novices: its router keeps every expert, and a "
            f"standard {builder.family.name} config has one expert count for its router and its experts, so a "
            "novice would have to be a whole expert (the memory the pruning saved); serve it with taskmoe, or "
            "calibrate the pattern with --substitute none to export it"
        )
    model = builder.build(selection)
    if builder.family.kind == "moe":
        counts = {
            int(model.get_submodule(layer.prefix).experts.num_experts) for layer in builder.sparse_layers.values()
        }
        if len(counts) != 1:
            raise ExportError(
                f"the selection keeps {sorted(counts)} experts in different layers; a {builder.family.name} config "
                "has one expert count, so export needs the same number of kept experts in every sparse layer"
            )
        routers = [
            router_of(model.get_submodule(layer.prefix), builder.family) for layer in builder.sparse_layers.values()
        ]
        overrides = [(getattr(router, "num_group", None), getattr(router, "topk_group", None)) for router in routers]
        if len(set(overrides)) > 1:
            raise ExportError("the selection needs different expert groups in different layers; a config has one")
    else:
        _pad_dense(model, builder, selection)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    finish_quantized_export(builder, selection, out, keep_quantization)
    for name in TOKENIZER_FILES:
        source = builder.model_dir / name
        if source.is_file():
            shutil.copy2(source, out / name)
    note = {"source": "taskmoe export", "model": str(builder.model_dir), "selection": selection.to_json()}
    (out / "taskmoe_selection.json").write_text(json.dumps(note, indent=1) + "\n")
    return out
