"""The running server follows its pattern store: patterns written by `taskmoe calibrate`, `taskmoe patterns
remove` or another server on the same directory are seen within `interval` seconds, without a restart.

A poll only stats the store's files (`PatternStore.disk_revision`), so polling every second or two costs
nothing; the store is re-read only when one changed. A file found damaged or unreadable at a read (a
truncated tensor file, a document overwritten with garbage) is logged as a warning naming it and why,
once, and again only if its problem changes; `PatternStore.problems` lists the current ones.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pattern_store.store import PatternStore

log = logging.getLogger("taskmoe.store")

StoreChange = Callable[[dict[str, str], dict[str, str]], None]
"""Called after a reload with each pattern's revision before and after (`PatternStore.revisions`)."""


class StoreWatcher:
    """Polls a store in a daemon thread and reports what changed."""

    def __init__(self, store: PatternStore, interval: float, on_change: StoreChange) -> None:
        if interval <= 0:
            raise ValueError("the store's poll interval must be positive")
        self.store, self.interval, self.on_change = store, interval, on_change
        self._known = store.revisions()
        self._problems = dict(store.problems)  # reported when the store was opened (`server.runtime.open_store`)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="taskmoe-store-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check(self) -> bool:
        """One poll: reload if the store changed on disk, then report any difference from what was last
        reported (this process's own writes included). True when something changed."""
        self.store.refresh_if_changed()
        self._report_problems()
        after = self.store.revisions()
        before, self._known = self._known, after
        if after == before:
            return False
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(name for name in set(after) & set(before) if after[name] != before[name])
        log.info("pattern store changed: added %s, removed %s, replaced %s", added, removed, changed)
        self.on_change(before, after)
        return True

    def _report_problems(self) -> None:
        problems = dict(self.store.problems)
        for file, problem in sorted(problems.items()):
            if self._problems.get(file) != problem:
                log.warning("pattern store: %s: %s", self.store.pattern_dir / file, problem)
        for file in sorted(set(self._problems) - set(problems)):
            log.info("pattern store: %s: no longer a problem", self.store.pattern_dir / file)
        self._problems = problems

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # a bad poll (a file vanishing mid-read) must not end the following
                log.exception("pattern store: reloading failed; trying again in %.1f s", self.interval)
