"""An exported variant of a quantized checkpoint, in the checkpoint's own precision or dequantized.

A variant is built dequantized (the module tree computes in the target dtype), so `save_pretrained` writes
plain tensors. Kept in the checkpoint's precision (`--dtype auto`), every tensor the source stores as
block-FP8 is written back as the source's raw e4m3 bytes with its scales (sliced to the kept experts:
`experts.{k}` of the export is `experts.{kept[k]}` of the source); gpt-oss's fused MXFP4 experts go back as
the source's `*_blocks` and `*_scales` of the kept experts, in the order kept. The source's
`quantization_config` stays, so vLLM, SGLang or transformers load the export as they load the original.
Dequantized (`--dtype bfloat16` and the like), the plain tensors stay and the `quantization_config` goes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pattern_store.selection import Selection
from server.model.checkpoint import CheckpointError, CheckpointReader, contiguous_runs
from server.model.quantization import SCALE_SUFFIX, QuantizedTensor
from server.model.variant import VariantBuilder

INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\blayers\.(\d+)\..*\.experts\.)(\d+)(\..+)$")
_LAYER = re.compile(r"\blayers\.(\d+)\.")


def finish_quantized_export(builder: VariantBuilder, selection: Selection, out: Path, keep: bool) -> None:
    """Rewrite the freshly saved export in `out` of a quantized checkpoint: its FP8 tensors and config back in
    the checkpoint's precision when `keep`, else only the config without `quantization_config`. Nothing to do
    for an unquantized checkpoint."""
    reader = builder.reader
    if reader.quantization is None:
        return
    selection = builder.layout.checked(selection)
    source_config = json.loads((builder.model_dir / "config.json").read_text())
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    if keep:
        kept = {layer: list(plan.kept) for layer, plan in builder.layout.moe_plan(selection).items()}
        _restore_quantized(reader, out, kept)
        config["quantization_config"] = source_config["quantization_config"]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _source_name(name: str, kept: dict[int, list[int]]) -> str:
    """The source checkpoint's name of an exported tensor: an exported expert k is the source's kept[k]."""
    match = _EXPERT.match(name)
    if match is None or int(match.group(2)) not in kept:
        return name
    return f"{match.group(1)}{kept[int(match.group(2))][int(match.group(3))]}{match.group(4)}"


def _restore_quantized(reader: CheckpointReader, out: Path, kept: dict[int, list[int]]) -> None:
    """Replace every exported tensor the source stores quantized by the source's stored bytes and scales."""
    added: dict[str, str] = {}
    removed: set[str] = set()
    for file in sorted(out.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                source = _source_name(name, kept)
                quantized = reader.quantized_info(source) if source in reader else None
                if quantized is None:
                    tensors[name] = handle.get_tensor(name)
                    continue
                stored = _mxfp4_tensors(reader, quantized, name, kept) if quantized.format == "mxfp4" else None
                if stored is None:
                    stored = _fp8_tensors(reader, quantized, name, tuple(handle.get_slice(name).get_shape()), out)
                else:
                    removed.add(name)
                tensors.update(stored)
                added.update(dict.fromkeys((key for key in stored if key != name), file.name))
        save_file(tensors, str(file), metadata=metadata)
    index = out / INDEX_FILE
    if index.is_file():
        document = json.loads(index.read_text())
        for name in removed:
            document["weight_map"].pop(name, None)
        document["weight_map"].update(added)
        index.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _fp8_tensors(
    reader: CheckpointReader, quantized: QuantizedTensor, name: str, shape: tuple[int, ...], out: Path
) -> dict[str, torch.Tensor]:
    """An exported FP8 weight as the source stores it: its e4m3 bytes and its scales."""
    if shape != quantized.shape:
        raise CheckpointError(
            f"{out}: exported {name} is cut from fp8 {quantized.name} across its blocks, so it cannot keep their "
            "precision; export it dequantized with --dtype bfloat16"
        )
    return {name: _stored(reader, quantized.data), name + SCALE_SUFFIX: _stored(reader, quantized.scale)}


def _mxfp4_tensors(
    reader: CheckpointReader, quantized: QuantizedTensor, name: str, kept: dict[int, list[int]]
) -> dict[str, torch.Tensor]:
    """An exported fused MXFP4 experts tensor as the source stores it: the kept experts' `*_blocks` and
    `*_scales`, in the order kept (all of them where the layer is not pruned)."""
    layer = _LAYER.search(name)
    experts = kept.get(int(layer.group(1))) if layer else None
    if experts is None:
        experts = list(range(reader.info(quantized.data).shape[0]))
    return {
        quantized.data: _stored_experts(reader, quantized.data, experts),
        quantized.scale: _stored_experts(reader, quantized.scale, experts),
    }


def _stored_experts(reader: CheckpointReader, name: str, experts: list[int]) -> torch.Tensor:
    """Rows `experts` of a stored fused tensor, as stored, each run of consecutive experts read once."""
    runs = [reader.rows_view(name, start, stop) for start, stop in contiguous_runs(experts)]
    return torch.cat(runs) if len(runs) > 1 else runs[0].clone()


def _stored(reader: CheckpointReader, name: str) -> torch.Tensor:
    """A stored tensor's bytes as they are in the checkpoint (a copy: the export's file is rewritten)."""
    return reader.rows_view(name, 0, reader.info(name).shape[0]).clone()
