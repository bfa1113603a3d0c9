"""Waiting for room, first come first served: the one admission rule of the expert pool and the variant cache.

A request that cannot fit now (its experts, or its variant, beside the ones in use) waits up to a deadline
for leases to end, then is refused with `NoRoom` (503 with Retry-After). Waiting requests are served in
arrival order, and while one waits newcomers queue behind it, even those that would fit: a request that
needs much room (the full model) is not starved by a stream of smaller ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.errors import NoRoom


class Admission:
    """The line for room of one pool or cache. Every method is called with `lock` (the owner's) held."""

    def __init__(self, lock: threading.Lock, wait: float) -> None:
        self.wait = wait
        self._room = threading.Condition(lock)
        self._line: list[object] = []

    def deadline(self, wait: float | None = None) -> float:
        """When a request arriving now stops waiting (`wait` seconds, default the owner's)."""
        return time.monotonic() + (self.wait if wait is None else wait)

    def admit(self, fits: Callable[[], bool], deadline: float, refusal: Callable[[int], str]) -> None:
        """Return once `fits()` holds and nobody who came earlier still waits; `refusal(ahead)` is the message
        of the `NoRoom` raised at `deadline` (`ahead`: requests still waiting in front)."""
        if not self._line and fits():
            return
        ticket = object()
        self._line.append(ticket)
        try:
            while self._line[0] is not ticket or not fits():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoRoom(refusal(self._line.index(ticket)))
                self._room.wait(timeout=remaining)
        finally:
            self._line.remove(ticket)
            self._room.notify_all()  # the next in line may fit now

    def freed(self) -> None:
        """Room may have been freed (a lease ended, a load failed, something was evicted): waiters look again."""
        self._room.notify_all()
