"""The error a checkpoint that cannot be read raises, shared by the reader and the quantization formats it reads
(a module of its own so that both can name it and neither imports the other)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as safetensors, or a tensor it does not hold."""
