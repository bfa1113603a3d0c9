"""Decoding a plan on a lease: every prompt's choices, in the lease's batched decoder when it has one (rows
of any pattern share its forward passes), else one generation at a time on the calling thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

from server.engine import Delta, Generation
from server.leases import Lease
from server.metrics import Metrics
from server.model_info import ModelInfo
from server.plan import Plan

Emit = Callable[[int, Delta], None]
"""Receives each delta with its choice's position in the response (prompt-major: prompt i, choice j is
i * n + j); called on the decoding thread."""


def decode(
    plan: Plan, lease: Lease, info: ModelInfo, metrics: Metrics, cancel: threading.Event, emit: Emit | None = None
) -> list[Generation]:
    """The generations of `plan`'s prompts, in order; stops early when `cancel` is set (the client left),
    which counts once in `taskmoe_generations_cancelled` however early it came."""
    done: list[Generation] = []
    for number, (ids, params) in enumerate(zip(plan.prompts, plan.params, strict=True)):
        if cancel.is_set():  # gone before this prompt began (while the request waited for its lease, say)
            metrics.cancelled.inc()
            break
        generation = Generation(lease.model, info.tokenizer, ids, params, info.eos_ids, cancel)
        first = number * plan.n

        def position(delta: Delta, first: int = first) -> None:
            emit(first + delta.index, delta)  # type: ignore[misc]

        try:
            if lease.decoder is not None:
                lease.decoder.run(generation, position if emit is not None else None, lease.route)
            else:
                for delta in generation:
                    if emit is not None:
                        position(delta)
        finally:
            metrics.tokens.labels("prompt").inc(len(ids))
            metrics.tokens.labels("completion").inc(generation.completion_tokens)
        done.append(generation)
        if generation.cancelled:
            metrics.cancelled.inc()
            break
    return done
