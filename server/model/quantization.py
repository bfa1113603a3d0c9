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
from dataclasses import dataclass
from typing import Any

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
