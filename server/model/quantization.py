"""The quantized checkpoint formats taskmoe reads, as their releases publish them, and their dequantization.

- Block-FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8, MiniMax-M2): `quantization_config` with
  `quant_method: fp8`, `fmt: e4m3` and `weight_block_size: [b0, b1]`; each quantized `X.weight` (F8_E4M3) has a
  sibling `X.weight_scale_inv` of shape [ceil(rows/b0), ceil(cols/b1)] in whatever float dtype the file says.
  Dequantization is DeepSeek's reference formula `w[i, j] = float(q[i, j]) * s[i // b0, j // b1]`, partial edge
  blocks included (transformers' CPU dequantization derives the block from the grid, wrong for partial blocks).
- MXFP4 (gpt-oss): `X_blocks` uint8 [..., R, G, 16], two e2m1 values per byte (low nibble first), and `X_scales`
  uint8 [..., R, G], one e8m0 power of two (2**(s - 127)) per group of 32 values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from server.model.checkpoint_errors import CheckpointError

FP8_FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MXFP4_GROUP = 32
READ_FORMATS = "fp8 (block-wise, fmt e4m3, weight_block_size [b0, b1], scales in weight_scale_inv) and mxfp4 (gpt-oss)"

# The 16 values of an e2m1 nibble: sign bit 3, exponent bits 2-1, mantissa bit 0 (the OCP MX spec's table).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class QuantizationError(CheckpointError):
    """A quantized checkpoint taskmoe cannot read as it is: an unknown format, or tensors that do not fit it."""


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's `quantization_config`, as far as taskmoe reads it.

    `block` is the block of values one scale covers: (b0, b1) rows x columns for fp8, (1, 32) for mxfp4.
    """

    method: str  # "fp8" or "mxfp4"
    fmt: str | None  # "e4m3" for fp8, None for mxfp4
    block: tuple[int, int]
    modules_to_not_convert: tuple[str, ...] = ()


def read_quantization(config_json: dict[str, Any]) -> QuantizationConfig | None:
    """The quantization a config.json declares; None for an unquantized checkpoint. Formats taskmoe does not read
    (awq, gptq, compressed-tensors, bitsandbytes, per-tensor fp8, ...) are a `QuantizationError`."""
    section = config_json.get("quantization_config")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise QuantizationError(f"config.json: quantization_config is {section!r}, not an object")
    method = section.get("quant_method")
    skip = tuple(str(m) for m in section.get("modules_to_not_convert") or ())
    if method == "mxfp4":
        return QuantizationConfig("mxfp4", None, (1, MXFP4_GROUP), skip)
    if method != "fp8":
        raise QuantizationError(
            f"config.json: quantization_config quant_method {method!r} is not a format taskmoe reads "
            f"(it reads {READ_FORMATS}); use the model's bf16 or fp8 release"
        )
    fmt = section.get("fmt", "e4m3")  # transformers' FineGrainedFP8Config writes no fmt: e4m3 is its only one
    if fmt not in FP8_FORMATS:
        raise QuantizationError(f"config.json: fp8 quantization_config fmt {fmt!r} is not read; taskmoe reads e4m3")
    block = section.get("weight_block_size")
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise QuantizationError(
            f"config.json: fp8 quantization_config weight_block_size is {block!r}; taskmoe reads block-wise fp8, "
            "which needs two positive block sizes such as [128, 128]"
        )
    return QuantizationConfig("fp8", fmt, (int(block[0]), int(block[1])), skip)


# -- block-FP8 ------------------------------------------------------------------------------------------------


def block_grid(rows: int, cols: int, block: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Rows and columns of the scale grid that covers `rows` x `cols` values starting at `origin` of the full
    tensor (blocks are counted from the full tensor's first row and column)."""
    (r0, c0), (b0, b1) = origin, block
    return math.ceil((r0 + rows) / b0) - r0 // b0, math.ceil((c0 + cols) / b1) - c0 // b1


def _segments(length: int, origin: int, block: int) -> list[tuple[int, int, int, int, int]]:
    """How `length` values starting at `origin` fall into blocks: (start, stop, block length, first scale, last
    scale + 1) per run of blocks of one length (a partial first block, the whole blocks, a partial last block)."""
    segments = []
    position, scale = 0, 0
    head = min(length, (-origin) % block)
    if head:
        segments.append((0, head, head, 0, 1))
        position, scale = head, 1
    whole = (length - position) // block
    if whole:
        segments.append((position, position + whole * block, block, scale, scale + whole))
        position, scale = position + whole * block, scale + whole
    if position < length:
        segments.append((position, length, length - position, scale, scale + 1))
    return segments


def dequantize_fp8_blocks(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """`w[..., i, j] = float(q[..., i, j]) * s[..., i // b0, j // b1]` (DeepSeek's reference), computed in float32
    and returned in `dtype`. Leading dimensions are a batch (a stack of experts [K, R, C] with scales
    [K, ceil(R/b0), ceil(C/b1)]). `origin` is where `q` starts in the full tensor when it is a slice of it (then
    `scale` holds the blocks the slice touches). The scales are broadcast block by block, never expanded."""
    if q.dim() < 2:
        raise QuantizationError(f"an fp8 block-quantized tensor has at least two dimensions, not shape {list(q.shape)}")
    rows, cols = q.shape[-2:]
    expected = (*q.shape[:-2], *block_grid(rows, cols, block, origin))
    if tuple(scale.shape) != expected:
        raise QuantizationError(
            f"fp8 scales of shape {list(scale.shape)} do not match a tensor of shape {list(q.shape)} in blocks of "
            f"{list(block)}: expected {list(expected)}"
        )
    out = q.to(torch.float32)
    scale = scale.to(torch.float32)
    for r_start, r_stop, r_len, s_r0, s_r1 in _segments(rows, origin[0], block[0]):
        for c_start, c_stop, c_len, s_c0, s_c1 in _segments(cols, origin[1], block[1]):
            piece = out[..., r_start:r_stop, c_start:c_stop].unflatten(-2, (-1, r_len)).unflatten(-1, (-1, c_len))
            piece.mul_(scale[..., s_r0:s_r1, s_c0:s_c1].unsqueeze(-1).unsqueeze(-3))
    return out.to(dtype)


# -- MXFP4 ----------------------------------------------------------------------------------------------------


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., R, G, 16] packed e2m1 pairs (low nibble first) with [..., R, G] e8m0 scales -> [..., R, G * 32]:
    `w = e2m1(nibble) * 2 ** (s - 127)`, computed in float32 (exact: a power of two times a 4-bit value)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise QuantizationError(f"mxfp4 blocks and scales are uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise QuantizationError(
            f"mxfp4 blocks of shape {list(blocks.shape)} and scales of shape {list(scales.shape)} do not fit: "
            f"expected blocks [..., R, G, {MXFP4_GROUP // 2}] and scales [..., R, G]"
        )
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), dim=-1).flatten(-2)
    values.mul_(torch.exp2(scales.to(torch.float32) - 127).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


# -- which tensors of a checkpoint are quantized ----------------------------------------------------------------

SCALE_SUFFIX = "_scale_inv"  # fp8: `X.weight` -> `X.weight_scale_inv`
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"  # mxfp4: `X` -> `X_blocks`, `X_scales`


class HeaderEntry(Protocol):
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor the checkpoint stores quantized: `data` and `scale` are the stored tensors' names, `shape` the
    tensor's shape as the model's module holds it (dequantized), `block` the values one scale covers.

    MXFP4 (gpt-oss) stores its experts [E, out, in] as blocks but the module holds them [E, in, out]:
    `transposed` says the dequantized stored tensor's last two dimensions are swapped to give `shape`."""

    name: str
    format: str  # "fp8_e4m3", "fp8_e5m2" or "mxfp4"
    data: str
    scale: str
    shape: tuple[int, ...]
    block: tuple[int, int]
    scale_dtype: torch.dtype
    transposed: bool = False


def index_quantized(
    headers: Mapping[str, HeaderEntry], config: QuantizationConfig | None, where: str
) -> dict[str, QuantizedTensor]:
    """The quantized tensors of a checkpoint by the name the model reads them under, each checked against its
    scales; a quantized tensor without its scale, a scale without its tensor or a scale grid that does not
    match the config's block size is a `QuantizationError` naming the tensor (`where`: the directory)."""
    found: dict[str, QuantizedTensor] = {}
    fp8 = [name for name, entry in headers.items() if entry.dtype in FP8_DTYPES]
    blocks = [name for name in headers if name.endswith(BLOCKS_SUFFIX) and headers[name].dtype == torch.uint8]
    if (fp8 or blocks) and config is None:
        stored = fp8[0] if fp8 else blocks[0]
        raise QuantizationError(
            f"{where}: tensor {stored} is stored quantized but config.json has no quantization_config"
        )
    for name in fp8:
        found[name] = _fp8_tensor(headers, name, config, where)
    for name in blocks:
        logical = _mxfp4_tensor(headers, name, config, where)
        found[logical.name] = logical
    covered = {q.scale for q in found.values()}
    for name in headers:
        if name.endswith((SCALE_SUFFIX, SCALES_SUFFIX)) and name not in covered:
            base = name.removesuffix(SCALE_SUFFIX).removesuffix(SCALES_SUFFIX)
            raise QuantizationError(
                f"{where}: {name} is a scale for {base}, which is not a quantized tensor of the checkpoint"
                + ("" if base in headers or base + BLOCKS_SUFFIX in headers else " (the checkpoint has no such tensor)")
            )
    return found


def _fp8_tensor(
    headers: Mapping[str, HeaderEntry], name: str, config: QuantizationConfig | None, where: str
) -> QuantizedTensor:
    entry = headers[name]
    if config is None or config.method != "fp8":
        method = config.method if config else None
        raise QuantizationError(f"{where}: tensor {name} is stored as fp8 but the quantization_config says {method}")
    scale_name = name + SCALE_SUFFIX
    scale = headers.get(scale_name)
    if scale is None:
        raise QuantizationError(f"{where}: fp8 tensor {name} has no scale {scale_name} in the checkpoint")
    if scale.dtype not in SCALE_DTYPES:
        raise QuantizationError(
            f"{where}: {scale_name} has dtype {scale.dtype}; fp8 block scales are float32, bfloat16 or float16"
        )
    if len(entry.shape) < 2:
        raise QuantizationError(f"{where}: fp8 tensor {name} has shape {list(entry.shape)}; block-wise fp8 is 2-D")
    rows, cols = entry.shape[-2:]
    expected = (*entry.shape[:-2], *block_grid(rows, cols, config.block))
    if tuple(scale.shape) != expected:
        implied = (
            [math.ceil(rows / scale.shape[-2]), math.ceil(cols / scale.shape[-1])]
            if len(scale.shape) == len(entry.shape) and min(scale.shape[-2:]) > 0
            else "no block size"
        )
        raise QuantizationError(
            f"{where}: {scale_name} has shape {list(scale.shape)}, but {name} {list(entry.shape)} in the config's "
            f"blocks of {list(config.block)} needs {list(expected)} (the stored grid implies blocks of {implied})"
        )
    fmt = "fp8_e4m3" if entry.dtype == torch.float8_e4m3fn else "fp8_e5m2"
    return QuantizedTensor(name, fmt, name, scale_name, tuple(entry.shape), config.block, scale.dtype)


def _mxfp4_tensor(
    headers: Mapping[str, HeaderEntry], name: str, config: QuantizationConfig | None, where: str
) -> QuantizedTensor:
    base = name.removesuffix(BLOCKS_SUFFIX)
    if config is None or config.method != "mxfp4":
        method = config.method if config else None
        raise QuantizationError(f"{where}: {name} holds mxfp4 blocks but the quantization_config says {method}")
    entry, scale_name = headers[name], base + SCALES_SUFFIX
    scale = headers.get(scale_name)
    if scale is None:
        raise QuantizationError(f"{where}: mxfp4 tensor {name} has no scales {scale_name} in the checkpoint")
    if (
        len(entry.shape) < 3
        or entry.shape[-1] != MXFP4_GROUP // 2
        or tuple(scale.shape) != tuple(entry.shape[:-1])
        or scale.dtype != torch.uint8
    ):
        raise QuantizationError(
            f"{where}: {name} {list(entry.shape)} with {scale_name} {list(scale.shape)} ({scale.dtype}) is not "
            f"mxfp4: expected blocks [..., R, G, {MXFP4_GROUP // 2}] and uint8 scales [..., R, G]"
        )
    *lead, rows, groups, _ = entry.shape
    shape = (*lead, groups * MXFP4_GROUP, rows)
    return QuantizedTensor(base, "mxfp4", name, scale_name, shape, config.block, scale.dtype, transposed=True)
