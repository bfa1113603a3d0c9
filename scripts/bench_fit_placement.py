#!/usr/bin/env python3
"""Where a running server should fit its router after a store change: why `server.fitting_process` exists.

Two clients send routed requests (8 tokens each) to the demo MoE's server, run in this process, while the
demo store's router is fitted again and again (the worst case of a store that keeps changing): nowhere
(quiet), on a lower-priority thread of the server's process (what a background thread would do), or in a
lower-priority process of its own (`FittingProcess`, what the server does). Conditions alternate, twice
each; the table has each condition's request latency percentiles over both rounds.

    python scripts/bench_fit_placement.py            # ~2 minutes; writes bench/results/fit_placement.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import uvicorn

from demo.tasks import get_task
from pattern_store.embedder import Embedder
from pattern_store.store import PatternStore
from server.app import create_app
from server.config import ServerConfig
from server.fitting_process import NICENESS, FittingProcess
from server.routing import Router, fit_router

from _measured import measured
from local_server import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "demo-moe"


def lower_this_threads_priority() -> None:
    """What a background thread of the server could do to yield: its own nice value (Linux)."""
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)


def refit_forever(router: Router, stop: threading.Event, where: str) -> int:
    """Fit the store's router until `stop`, on this thread (`where` = "thread") or in the fitting process."""
    examples, fits = router.store.examples(), 0
    fitter = FittingProcess()
    if where == "thread":
        lower_this_threads_priority()
    else:
        fitter.run(int, 0)  # started before the clock runs
    while not stop.is_set():
        if where == "thread":
            fit_router(router.rule, router.features.weights, examples)
        else:
            fitter.run(fit_router, router.rule, router.features.weights, examples)
        fits += 1
    fitter.close()
    return fits


@contextmanager
def in_process_server(store: Path) -> Iterator[str]:
    """`taskmoe serve`'s app on loopback in a thread of this process (a thread fit must share its GIL)."""
    app = create_app(ServerConfig(model=MODEL, store=store, store_poll=0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server did not start: {getattr(app.state, 'load_error', None)}")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def routed_load(url: str, prompts: list[str], seconds: float) -> list[float]:
    """Per-request seconds of two clients sending routed chat requests (8 tokens) for `seconds`."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    def client(offset: int) -> None:
        with httpx.Client(timeout=120) as http:
            count = offset
            while time.monotonic() < deadline:
                body = {"model": "demo-moe", "messages": [{"role": "user", "content": prompts[count % len(prompts)]}]}
                began = time.perf_counter()
                http.post(f"{url}/v1/chat/completions", json=body | {"max_tokens": 8}).raise_for_status()
                latencies.append(time.perf_counter() - began)
                count += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def measure(condition: str, router: Router, fits: dict[str, int], load: Any) -> list[float]:
    """`load()`'s latencies while the router is fitted again and again as `condition` says."""
    if condition == "quiet":
        return load()
    stop, done = threading.Event(), {}
    fitting = threading.Thread(target=lambda: done.update(n=refit_forever(router, stop, condition)))
    fitting.start()
    time.sleep(3 if condition == "process" else 0.5)  # the process starts (imports) first
    latencies = load()
    stop.set()
    fitting.join()
    fits[condition] += done.get("n", 0)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per condition and round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fit_placement.json")
    args = parser.parse_args()
    prompts = [e.prompt for task in ("arith", "upper", "spell", "translate") for e in get_task(task).examples(4, 7)]
    samples: dict[str, list[float]] = {"quiet": [], "thread": [], "process": []}
    fits: dict[str, int] = {"thread": 0, "process": 0}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(shutil.copytree(MODEL / "patterns", Path(tmp) / "patterns"))
        router = Router(PatternStore(store, create=False), Embedder())
        with in_process_server(store) as url:
            routed_load(url, prompts, 3)  # warm
            for round in range(2):
                for condition in samples:
                    samples[condition] += measure(
                        condition, router, fits, lambda: routed_load(url, prompts, args.seconds)
                    )
                    print(f"round {round + 1}, {condition}: {summary(samples[condition])}", flush=True)
    rows = {condition: summary(latencies) | {"fits": fits.get(condition)} for condition, latencies in samples.items()}
    print(f"\n{'fit placement':<14}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'fits':>6}")
    for condition, row in rows.items():
        cells = f"{row['requests']:>9}{row['p50_ms']:>9}{row['p99_ms']:>9}{row['max_ms']:>9}{row['fits'] or '':>6}"
        print(f"{condition:<14}{cells}")
    report = {"conditions": rows, "seconds_per_condition": 2 * args.seconds, "measured": measured()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
