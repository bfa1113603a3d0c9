"""Copying experts from the checkpoint into the preallocated slots of a pooled model.

The bytes go straight from the checkpoint's memory map into the slot tensors: runs of consecutive experts
going to consecutive slots are one copy each, and nothing is materialised in between (but a quantized
checkpoint's experts, dequantized run by run on the way). Copies into GPU memory
pass through one reused pinned host buffer (pinned memory is costly to allocate, and a copy from pageable
memory is staged by the driver anyway).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from server.model.layout import SparseLayer
from server.model.tensor_reader import TensorReader


def paired_runs(experts: Sequence[int], slots: Sequence[int]) -> list[tuple[int, int]]:
    """(first position, length) of the runs where consecutive experts go to consecutive slots."""
    runs: list[tuple[int, int]] = []
    for position in range(len(experts)):
        if runs:
            first, count = runs[-1]
            if experts[position] == experts[first] + count and slots[position] == slots[first] + count:
                runs[-1] = (first, count + 1)
                continue
        runs.append((position, 1))
    return runs


def host_copy(target: torch.Tensor, source: torch.Tensor) -> None:
    """`target.copy_(source)`; a plain byte copy (numpy's, one thread) when both are contiguous host tensors of
    one dtype. torch parallelises large copies over its OpenMP threads, which a busy machine (the decoder
    computing on the same cores) stalls: measured 35x slower than this copy on 2 busy cores. Used by the
    quantized slots' loads (`CopyBatch`, docs/benchmarks.md#fp8-expert-slots); the model-dtype slots' loads
    keep torch's copy, as `bench_variants.py` measured them."""
    same = target.dtype == source.dtype and target.device.type == source.device.type == "cpu"
    if not (same and target.is_contiguous() and source.is_contiguous() and target.shape == source.shape):
        target.copy_(source)
        return
    np.copyto(target.view(torch.uint8).numpy(), source.view(torch.uint8).numpy())


def _copy_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


class CopyBatch:
    """Copies collected while a load is planned (`batch(target, source)`), then run together (`run()`): host
    copies on a few threads at once, numpy's copy releasing the GIL. One thread copies at about the memory's
    rate per core; two on a quiet 2-core machine come near the best parallel copy, and unlike torch's OpenMP
    copy they do not stall when the cores are busy. Copies into GPU memory go through the loader's staging."""

    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def __init__(self, loader: SlotLoader) -> None:
        self.loader = loader
        self.jobs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, target: torch.Tensor, source: torch.Tensor) -> None:
        self.jobs.append((target, source))

    def run(self) -> None:
        host = [job for job in self.jobs if job[0].device.type == "cpu" and job[1].device.type == "cpu"]
        for target, source in self.jobs:
            if target.device.type != "cpu" or source.device.type != "cpu":
                self.loader.copy(target, source)
        threads = _copy_threads()
        if threads == 1 or len(host) < 2:
            for target, source in host:
                host_copy(target, source)
            return
        shares: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(threads)]
        sizes = [0] * threads
        for job in sorted(host, key=lambda job: -job[0].numel() * job[0].element_size()):
            lightest = sizes.index(min(sizes))
            shares[lightest].append(job)
            sizes[lightest] += job[0].numel() * job[0].element_size()
        list(self._threads().map(_copy_share, shares))  # waits for every share, raising the first failure

    @classmethod
    def _threads(cls) -> ThreadPoolExecutor:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(max_workers=_copy_threads(), thread_name_prefix="slot-copy")
            return cls._pool


def _copy_share(jobs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for target, source in jobs:
        host_copy(target, source)


class SlotLoader:
    """Copies experts of one checkpoint into slot tensors; thread-safe."""

    def __init__(self, tensors: TensorReader) -> None:
        self.tensors = tensors
        self._staging: torch.Tensor | None = None  # pinned host buffer for copies into GPU memory
        self._staging_lock = threading.Lock()

    def load(
        self, layer: SparseLayer, experts: Sequence[int], slots: Sequence[int], targets: Mapping[str, torch.Tensor]
    ) -> None:
        """Copy `experts[i]` into slot `slots[i]` of a pooled layer's slot tensors: `targets` maps each of the
        experts module's per-expert tensors (`gate_up_proj` [S, 2I, H], `down_proj` [S, H, I], any expert
        biases) to its slots."""
        checkpoint = self.tensors.checkpoint
        fused = self.tensors.fused_expert_names(layer)
        gate_up, down = targets["gate_up_proj"], targets["down_proj"]
        biases = [name for name in targets if name not in ("gate_up_proj", "down_proj")]  # always stored fused
        extras = {name: self.tensors.required_name(f"{layer.prefix}.experts.{name}") for name in biases}
        size = layer.intermediate
        for first, count in paired_runs(experts, slots):
            expert, slot = experts[first], slots[first]
            for name in biases:
                self.copy(
                    targets[name][slot : slot + count], checkpoint.rows_view(extras[name], expert, expert + count)
                )
            if fused is not None:
                self.copy(gate_up[slot : slot + count], checkpoint.rows_to_copy(fused[0], expert, expert + count))
                self.copy(down[slot : slot + count], checkpoint.rows_to_copy(fused[1], expert, expert + count))
                continue
            for offset in range(count):
                gate_name, up_name, down_name = self.tensors.expert_names(layer, expert + offset)
                target = slot + offset
                self.copy(gate_up[target, :size], checkpoint.rows_to_copy(gate_name, 0, size))
                self.copy(gate_up[target, size:], checkpoint.rows_to_copy(up_name, 0, size))
                self.copy(down[target], checkpoint.rows_to_copy(down_name, 0, checkpoint.info(down_name).shape[0]))

    def batch(self) -> CopyBatch:
        """A batch of copies to plan now and run together (`CopyBatch`)."""
        return CopyBatch(self)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """`target.copy_(source)`; into GPU memory through the pinned staging buffer."""
        if target.device.type != "cuda" or source.device.type == "cuda":
            target.copy_(source)
            return
        nbytes = target.numel() * target.element_size()
        with self._staging_lock:
            if self._staging is None or self._staging.numel() < nbytes:
                self._staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            staging = self._staging[:nbytes].view(target.dtype).view(target.shape)
            staging.copy_(source)
            target.copy_(staging, non_blocking=True)
            torch.cuda.current_stream(target.device).synchronize()  # before the buffer is written again
