"""Work that must follow a changing input but never hold up a request: the router is learnt again after a
store change in the background, once for the latest state however many changes came in a burst. The thread
only waits: the fit itself runs in the fitting process (`server.fitting_process`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("taskmoe.relearning")


class Relearning:
    """Runs `work` in the background on `request()`: at most one run at a time, at most one per
    `min_interval`, and requests made while it runs (or waits) lead to one more run afterwards (which sees
    the latest state), not one each."""

    def __init__(self, work: Callable[[], object], name: str, min_interval: float = 0.0) -> None:
        """`min_interval`: seconds from one run's start to the next's (a run asked for sooner waits)."""
        self.work, self.name, self.min_interval = work, name, min_interval
        self._last_start = -float("inf")
        self._pending = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.runs = 0  # finished runs, failed ones included

    def request(self) -> None:
        """Ask for a run soon; returns at once."""
        with self._lock:
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    @property
    def busy(self) -> bool:
        """A run is going on or asked for."""
        with self._lock:
            return self._thread is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no run is going on or asked for; False when `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._thread is None, timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    self._idle.notify_all()
                    return
            time.sleep(max(0.0, self._last_start + self.min_interval - time.monotonic()))
            with self._lock:
                self._pending = False  # what is asked from now on needs another run
            self._last_start = time.monotonic()
            try:
                self.work()
            except Exception:  # the next change asks again; until then requests keep the router they have
                log.exception("%s: relearning failed", self.name)
            with self._lock:
                self.runs += 1
