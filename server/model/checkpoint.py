"""Reading tensors, and parts of tensors, from a safetensors checkpoint that stays on disk.

The files are opened with `safe_open` (mmap): nothing is read until a tensor or a slice is asked for,
and then only its bytes. Every read is counted, so tests and benchmarks can check the contract that
building a variant reads the backbone and the kept experts and nothing else. A checkpoint's identity, which
every pattern records, is its `model_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import GenerationConfig

from server.model.checkpoint_errors import CheckpointError
from server.model.quantization import (
    QuantizationConfig,
    QuantizationError,
    QuantizedTensor,
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    index_quantized,
    read_quantization,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.element_size


def contiguous_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive indices, in the given order: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


class CheckpointReader:
    """A safetensors checkpoint, single-file or sharded, read tensor by tensor through mmap.

    Thread-safe: the byte counter is guarded, and `safe_open` handles are only read from.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._bytes_read = 0
        self._files: dict[Path, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._maps: dict[Path, tuple[mmap.mmap, int, dict[str, Any]]] = {}  # file -> (map, data start, header)
        self._views: dict[str, torch.Tensor] = {}  # stored tensors viewed in their file's map, by name
        for file in self._weight_files():
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as error:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
            self._files[file] = handle
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                sliced = handle.get_slice(name)
                dtype = _DTYPES.get(sliced.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{file}: tensor {name} has dtype {sliced.get_dtype()}, which taskmoe does not read yet "
                        f"(supported: {', '.join(_DTYPES)})"
                    )
                self._infos[name] = TensorInfo(file, tuple(sliced.get_shape()), dtype)
        self.quantization = read_checkpoint_quantization(self.directory)
        self._quantized = index_quantized(self._infos, self.quantization, str(self.directory))

    def _weight_files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{index}: not a safetensors index ({error})") from None
            files = sorted({self.directory / shard for shard in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
            return files
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return [single]
        raise CheckpointError(
            f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors is supported)"
        )

    # -- what is there -------------------------------------------------------------------------

    @property
    def names(self) -> Iterable[str]:
        return self._infos.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._infos or name in self._quantized

    def info(self, name: str) -> TensorInfo:
        """A stored tensor's place, shape and dtype; for a tensor stored as MXFP4 blocks and scales under other
        names, its shape as the model holds it and float32, the dtype reads return it in."""
        info = self._infos.get(name)
        if info is not None:
            return info
        quantized = self._quantized.get(name)
        if quantized is not None:
            return TensorInfo(self._infos[quantized.data].file, quantized.shape, torch.float32)
        raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {name!r}")

    def quantized_info(self, name: str) -> QuantizedTensor | None:
        """How the tensor the model calls `name` is stored quantized (format, stored data and scale names,
        shape, block), None if it is stored as it is used. Its raw rows can be read with `rows_view`."""
        return self._quantized.get(name)

    @property
    def quantized(self) -> dict[str, QuantizedTensor]:
        """Every quantized tensor, by the name the model reads it under."""
        return dict(self._quantized)

    def stored_nbytes(self, name: str) -> int:
        """Bytes the checkpoint stores for `name`: a quantized tensor's data and its scales."""
        quantized = self._quantized.get(name)
        if quantized is None:
            return self.info(name).nbytes
        return self._infos[quantized.data].nbytes + self._infos[quantized.scale].nbytes

    @property
    def total_bytes(self) -> int:
        """Size of every tensor as stored (quantized tensors: their data and scales): what a full load reads."""
        return sum(info.nbytes for info in self._infos.values())

    # -- reading -------------------------------------------------------------------------------

    @property
    def bytes_read(self) -> int:
        """Tensor bytes copied out of the checkpoint so far by this reader."""
        with self._lock:
            return self._bytes_read

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor. safetensors may return it as a view of the mmap (its pages are read when first
        touched); callers that keep it make their own copy. A quantized tensor is dequantized (float32)."""
        if name in self._quantized:
            return self._dequantized(self._quantized[name], None, 0, 0)
        info = self.info(name)
        return self._count(self._files[info.file].get_tensor(name))

    def read_index(self, name: str, index: int) -> torch.Tensor:
        """`tensor[index]` along the first dimension (one expert of a fused expert tensor)."""
        info = self.info(name)
        if not 0 <= index < info.shape[0]:
            raise CheckpointError(f"{name}: index {index} out of range for first dimension {info.shape[0]}")
        if name in self._quantized:
            return self._dequantized(self._quantized[name], 0, index, index + 1)[0]
        return self._count(self._files[info.file].get_slice(name)[index : index + 1])[0]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """`tensor[start:stop]` along the first dimension (a run of experts of a fused expert tensor)."""
        info = self.info(name)
        if not 0 <= start < stop <= info.shape[0]:
            raise CheckpointError(f"{name}: rows {start}:{stop} out of range for first dimension {info.shape[0]}")
        if name in self._quantized:
            return self._dequantized(self._quantized[name], 0, start, stop)
        return self._count(self._files[info.file].get_slice(name)[start:stop])

    def rows_view(self, name: str, start: int, stop: int) -> torch.Tensor:
        """`tensor[start:stop]` along the first dimension as a view of the file's memory map: no copy is made,
        and the pages are read when the caller copies from it. The expert pool copies experts this way
        straight into its preallocated slots (one copy instead of two). Counted like a read.

        This is the stored tensor as it is: an fp8 weight's raw e4m3 rows, without its scales (see
        `quantized_info`); `read_rows` dequantizes."""
        if name not in self._infos:
            raise CheckpointError(
                f"{self.directory}: {name!r} is not a stored tensor"
                + (" (it is stored as mxfp4 blocks and scales: view those)" if name in self._quantized else "")
            )
        info = self.info(name)
        if not 0 <= start < stop <= info.shape[0]:
            raise CheckpointError(f"{name}: rows {start}:{stop} out of range for first dimension {info.shape[0]}")
        return self._count(self._whole_view(name, info)[start:stop])

    def _whole_view(self, name: str, info: TensorInfo) -> torch.Tensor:
        """The whole stored tensor as a view of the file's map, made once per tensor: a pool load slices it for
        every expert it copies (thousands of small copies, scales among them), so the view costs nothing then."""
        view = self._views.get(name)
        if view is None:
            mapped, data_start, header = self._mapped(info.file)
            begin, _ = header[name]["data_offsets"]
            count = math.prod(info.shape)
            with warnings.catch_warnings():  # the map is read-only, and so is every use of the view: copies from it
                warnings.simplefilter("ignore", UserWarning)
                view = torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=data_start + begin)
            view = self._views.setdefault(name, view.view(info.shape))
        return view

    def rows_to_copy(self, name: str, start: int, stop: int) -> torch.Tensor:
        """`tensor[start:stop]` in the values the model uses, to copy from: a view of the memory map for a
        tensor stored as it is used, the dequantized rows (float32) of a quantized one."""
        if name in self._quantized:
            return self.read_rows(name, start, stop)
        return self.rows_view(name, start, stop)

    def _mapped(self, file: Path) -> tuple[mmap.mmap, int, dict[str, Any]]:
        """The file mapped read-only and shared (a private, copy-on-write map faults its pages in one by one,
        much slower on a first pass), with its safetensors header: 8 bytes of header length, the JSON header,
        then the data."""
        with self._lock:
            entry = self._maps.get(file)
            if entry is None:
                with open(file, "rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                (length,) = struct.unpack("<Q", mapped[:8])
                entry = self._maps[file] = (mapped, 8 + length, json.loads(bytes(mapped[8 : 8 + length])))
            return entry

    def read_indices(self, name: str, indices: Sequence[int], dim: int = 0) -> torch.Tensor:
        """`tensor.index_select(dim, indices)` for dim 0 or 1, reading only the selected rows or columns.

        Consecutive indices are read as one slice; the result keeps the order of `indices`.
        """
        info = self.info(name)
        if dim not in (0, 1) or dim >= len(info.shape):
            raise CheckpointError(f"{name}: can only select along dimension 0 or 1 of a {len(info.shape)}-D tensor")
        size = info.shape[dim]
        bad = [i for i in indices if not 0 <= i < size]
        if bad:
            raise CheckpointError(f"{name}: indices {bad[:5]} out of range for dimension {dim} of size {size}")
        quantized = self._quantized.get(name)
        sliced = None if quantized else self._files[info.file].get_slice(name)
        parts = []
        for start, stop in contiguous_runs(indices):
            if quantized is not None:
                parts.append(self._dequantized(quantized, dim, start, stop))
                continue
            part = sliced[start:stop] if dim == 0 else sliced[:, start:stop]
            parts.append(self._count(part))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _dequantized(self, quantized: QuantizedTensor, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """`tensor[..., start:stop, ...]` along `dim` (the whole tensor when None) of a quantized tensor, in
        float32, reading only the stored data and the scales of the blocks it touches (both counted)."""
        data_info, scale_info = self._infos[quantized.data], self._infos[quantized.scale]
        data = self._files[data_info.file].get_slice(quantized.data)
        scale = self._files[scale_info.file].get_slice(quantized.scale)
        data_part, scale_part, origin = quantized_slices(quantized, data, scale, dim, start, stop)
        self._count(data_part)
        self._count(scale_part)
        if quantized.format == "mxfp4":
            return dequantize_mxfp4(data_part, scale_part).transpose(-1, -2)
        return dequantize_fp8_blocks(data_part, scale_part, quantized.block, origin=origin)


def read_checkpoint_quantization(directory: Path) -> QuantizationConfig | None:
    """The quantization the directory's config.json declares (None without one, or for an unquantized model)."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not JSON ({error})") from None
    try:
        return read_quantization(config)
    except QuantizationError as error:
        raise QuantizationError(str(error).replace("config.json:", f"{config_file}:", 1)) from None


def quantized_slices(
    quantized: QuantizedTensor, data: Any, scale: Any, dim: int | None, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The stored data and scales that `tensor[start:stop]` along `dim` of a quantized tensor needs (from
    safetensors slices), and where the data part starts in its last two dimensions (fp8 blocks count from the
    full tensor's first row and column)."""
    if dim is None:
        return data[:], scale[:], (0, 0)
    rank = len(quantized.shape)
    lead = (slice(None),) * dim
    if dim < rank - 2:  # a batch dimension (experts): data and scales alike
        return data[(*lead, slice(start, stop))], scale[(*lead, slice(start, stop))], (0, 0)
    if quantized.format == "mxfp4":
        raise CheckpointError(
            f"{quantized.data}: only whole experts of an mxfp4 tensor are read, not a slice of dimension {dim}"
        )
    block = quantized.block[dim - (rank - 2)]
    blocks = slice(start // block, -(-stop // block))
    origin = (start, 0) if dim == rank - 2 else (0, start)
    return data[(*lead, slice(start, stop))], scale[(*lead, blocks)], origin


def read_generation_config(model_dir: str | Path) -> GenerationConfig | None:
    """The checkpoint's `generation_config.json` (its end-of-generation tokens among others), if it has one."""
    directory = Path(model_dir)
    return GenerationConfig.from_pretrained(directory) if (directory / "generation_config.json").is_file() else None


def model_fingerprint(model_dir: str | Path) -> str:
    """What makes a checkpoint this model: its config, every tensor's name, shape and dtype (the safetensors
    headers) and a sample of the weights, which tells a retrained model of the same shapes apart. Reads
    no more than a few kilobytes per file."""
    directory = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((directory / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(size))
            digest.update(handle.read(4096))  # a sample of the weights: retrained models differ here
    return digest.hexdigest()


_NOT_ARCHITECTURE = ("quantization_config", "dtype", "torch_dtype", "transformers_version")


def model_identity(model_dir: str | Path) -> dict[str, str]:
    """What a pattern records of its model besides the fingerprint, so that a mismatch can say what differs:
    the directory's name, its precision ("fp8 e4m3, blocks [128, 128]", "mxfp4", "bfloat16", ...) and a hash of
    its architecture (config without its precision, the tensors' names and shapes as the model uses them), the
    same for a model's bf16 and FP8 releases. Reads only the safetensors headers."""
    directory = Path(model_dir)
    reader = CheckpointReader(directory)
    config = json.loads((directory / "config.json").read_text())
    for key in _NOT_ARCHITECTURE:
        config.pop(key, None)
    quantized = reader.quantized
    stored = {q.scale for q in quantized.values()} | {q.data for q in quantized.values()}
    shapes = {name: list(reader.info(name).shape) for name in reader.names if name not in stored}
    shapes |= {name: list(q.shape) for name, q in quantized.items()}
    digest = hashlib.sha256(json.dumps([config, sorted(shapes.items())], sort_keys=True).encode()).hexdigest()
    quantization = reader.quantization
    if quantization is None:
        dtypes = [reader.info(name).dtype for name in reader.names if reader.info(name).dtype.is_floating_point]
        precision = str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.") if dtypes else "unknown"
    elif quantization.method == "fp8":
        precision = f"fp8 {quantization.fmt}, blocks {list(quantization.block)}"
    else:
        precision = quantization.method
    return {"name": directory.resolve().name, "architecture": digest, "precision": precision}
