"""A process of its own, at a lower CPU priority, for the fits a running server makes (the router, after a
store change): a fit in a thread of the server would hold its GIL for a second at a time, and every
request's Python would wait behind it.

`scripts/bench_fit_placement.py` measures it: two clients of a demo server, its router refitted without
pause on a lower-priority thread of the server or in this process (docs/benchmarks.md).

The process is started on the first fit (spawned: it imports torch and scikit-learn, a second or two and a
few hundred MB) and kept for the next ones. Arguments and results cross as pickles by value.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger("taskmoe.fitting")

NICENESS = 5
"""How much lower the fitting process's CPU priority is than the server's (Linux nice steps): on cores that
decode requests, a fit takes mostly the time they leave. Chosen on `scripts/bench_store_changes.py`'s churn
(2 cores saturated by 4 clients, a change every 1.5 s): at 0 the slowest routed request under churn was
1.9x the quiet one's; at 10 routing never caught up while the load lasted (imports waited 40 s for it);
at 5, 1.4x, with imports answered in 5 to 27 s."""

T = TypeVar("T")


def _start_fitting_process() -> None:
    """In the fitting process: yield the CPU to the server, and one thread for torch."""
    with contextlib.suppress(AttributeError, OSError):  # no nice here, or a container forbids it
        os.nice(NICENESS)
    import torch

    torch.set_num_threads(1)


def _call(function: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """In the fitting process: the result, pickled here so that tensors cross by value."""
    return pickle.dumps(function(*args))


class FittingProcess:
    """Runs `function(*args)` in the fitting process and returns its result (the calling thread waits).
    Where no process can be started, or it died, the fit runs on the calling thread instead, said once."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._in_process = False

    def run(self, function: Callable[..., T], *args: Any) -> T:
        pool = self._started()
        if pool is not None:
            try:
                return pickle.loads(pool.submit(_call, function, args).result())
            except BrokenProcessPool:
                log.warning("the fitting process died; starting another for the next fit, fitting here now")
                with self._lock:
                    self._pool = None
        return function(*args)

    def _started(self) -> ProcessPoolExecutor | None:
        with self._lock:
            if self._pool is None and not self._in_process:
                try:
                    context = multiprocessing.get_context("spawn")
                    self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_fitting_process)
                except (OSError, ValueError, NotImplementedError) as error:
                    log.warning("no fitting process (%s): fits run in the server's own threads", error)
                    self._in_process = True
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
