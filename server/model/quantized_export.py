"""An exported variant of a quantized checkpoint, in the checkpoint's own precision or dequantized.

A variant is built dequantized (the module tree computes in the target dtype), so `save_pretrained` writes
plain tensors. Kept in the checkpoint's precision (`--dtype auto`), every tensor the source stores as
block-FP8 is written back as the source's raw e4m3 bytes with its scales (sliced to the kept experts:
`experts.{k}` of the export is `experts.{kept[k]}` of the source), and the source's `quantization_config`
stays, so vLLM, SGLang or transformers load the export as they load the original. Dequantized (`--dtype
bfloat16` and the like), the plain tensors stay and the `quantization_config` goes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pattern_store.selection import Selection
from server.model.checkpoint import CheckpointError, CheckpointReader
from server.model.quantization import SCALE_SUFFIX
from server.model.variant import VariantBuilder

INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\blayers\.(\d+)\..*\.experts\.)(\d+)(\..+)$")


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
        if reader.quantization.method != "fp8":
            raise CheckpointError(
                f"{builder.model_dir}: an export in the checkpoint's {reader.quantization.method} precision is not "
                "written yet; export it dequantized with --dtype bfloat16"
            )
        kept = {layer: list(plan.kept) for layer, plan in builder.layout.moe_plan(selection).items()}
        _restore_fp8(reader, out, kept)
        config["quantization_config"] = source_config["quantization_config"]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _source_name(name: str, kept: dict[int, list[int]]) -> str:
    """The source checkpoint's name of an exported tensor: an exported expert k is the source's kept[k]."""
    match = _EXPERT.match(name)
    if match is None or int(match.group(2)) not in kept:
        return name
    return f"{match.group(1)}{kept[int(match.group(2))][int(match.group(3))]}{match.group(4)}"


def _restore_fp8(reader: CheckpointReader, out: Path, kept: dict[int, list[int]]) -> None:
    """Replace every exported tensor the source stores as FP8 by the source's e4m3 bytes and scales."""
    added: dict[str, str] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                source = _source_name(name, kept)
                quantized = reader.quantized_info(source) if source in reader else None
                if quantized is None or quantized.format == "mxfp4":
                    tensors[name] = handle.get_tensor(name)
                    continue
                if tuple(handle.get_slice(name).get_shape()) != quantized.shape:
                    raise CheckpointError(
                        f"{out}: exported {name} is cut from fp8 {source} across its blocks, so it cannot keep "
                        "their precision; export it dequantized with --dtype bfloat16"
                    )
                tensors[name] = _stored(reader, quantized.data)
                tensors[name + SCALE_SUFFIX] = _stored(reader, quantized.scale)
                added[name + SCALE_SUFFIX] = file.name
        save_file(tensors, str(file), metadata=metadata)
    index = out / INDEX_FILE
    if index.is_file():
        document = json.loads(index.read_text())
        document["weight_map"].update(added)
        index.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _stored(reader: CheckpointReader, name: str) -> torch.Tensor:
    """A stored tensor's bytes as they are in the checkpoint (a copy: the export's file is rewritten)."""
    return reader.rows_view(name, 0, reader.info(name).shape[0]).clone()
