#!/usr/bin/env python3
"""Benchmark issue 24, "store changes never stall or fail traffic", through `taskmoe serve`: two servers on
one shared copy of the demo store (admin key set, shipped defaults otherwise: store poll 2 s), each logging
JSON lines to a file. Phases and targets:

1. load: 4 routed clients (2 per server), quiet / churn / quiet / churn; in churn phases a renamed copy of a
   stored pattern is imported every ~3 s (servers alternating) and the previous copy deleted. The slowest
   routed request in churn phases <= 1.5x the slowest in quiet ones (medians of per-phase maxima); 0 non-200.
2. reproducer of the routed 404: "upper" deleted, then N times: `upper-N` imported, a routed "upper" query
   sent, `upper-N` deleted one second later on the same server; then a routed query to the other server
   (which sees the delete at its next poll) and one to this one. 0 non-200.
3. damage: sort's tensor file truncated, spell.json overwritten. Each server logs a warning naming each file
   within store poll + 2 s, lists both in `GET /admin/store`, answers 503 `pattern_damaged`; restored, 200.
4. cut streams, under churn: streamed named requests (`ignore_eos`, 200 tokens) cut by the client right after
   sending or after k content chunks. Each stops within 2 tokens of the cut and is counted as cancelled.

    python scripts/bench_store_changes.py            # the full run (~5 minutes), on a quiet machine
    python scripts/bench_store_changes.py --quick    # a ~1-minute smoke run, to a temporary file
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai

from demo.tasks import get_task
from pattern_store.pattern import pattern_to_bundle
from pattern_store.store import PatternStore

from _measured import measured
from local_server import free_port, scrape, start_server

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arith", "reverse", "sort", "upper", "spell", "translate")
STREAM_TASKS = ("arith", "reverse", "upper", "spell", "translate")  # sort's prompts + 200 tokens exceed 256
KEY = "bench-admin-key"
STORE_POLL, CHURN_EVERY = 2.0, 3.0  # the shipped `--store-poll`; seconds between churn steps
LOAD_MAX_TOKENS, REPRO_MAX_TOKENS, STREAM_MAX_TOKENS = 8, 32, 200
CHURN_RATIO, WARNING_SECONDS, CUT_TOKENS = 1.5, STORE_POLL + 2, 2
COUNTERS = {
    "completion_tokens": 'taskmoe_tokens_total{kind="completion"}',
    "cancelled": "taskmoe_generations_cancelled_total",
}
TOKENS_NOTE = (
    "tokens_after_cut = the server's taskmoe_tokens_total{kind=completion} delta minus tokens_behind_text: the "
    "fewest tokens whose greedy answer (same model and prompt, non-streamed, asked afterwards) holds the text the "
    "client had received when it closed: every content chunk it read, and those already in its socket when it "
    "closed (read without waiting: the server had sent them before the cut). One character per token in the demo "
    "tokenizer; special tokens show no text. An upper bound: tokens in flight on loopback and invisible tokens "
    "before the cut count as after it. delta_minus_chunks_read: the delta minus k, the content chunks the client "
    "waited for (a chunk may hold more than one token, and more than k may have arrived: chunks_received)."
)


@dataclass
class Server:
    """One `taskmoe serve` process and the file its stderr (JSON log lines) goes to."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.request(method, f"{self.url}/admin{path}", headers=headers, timeout=120, **kwargs)

    def timed_admin(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """An admin call as a record: what, its status and seconds."""
        started = time.perf_counter()
        status = self.admin(method, path, **kwargs).status_code
        return {"what": f"{what} on {self.name}", "status": status, "seconds": round(time.perf_counter() - started, 3)}

    def metrics(self) -> dict[str, float]:
        """Every sample of `/metrics`, keyed by its name with labels as written."""
        return scrape(self.url)

    def log_lines(self, offset: int) -> list[dict[str, Any]]:
        """The JSON log lines written from byte `offset` on (a partly written last line is skipped)."""
        with self.log.open("rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]


def start(name: str, store: Path, log: Path, timeout: float = 300) -> Server:
    """`taskmoe serve` on the shared store (its log in `log`), returned once `/ready` answers 200."""
    port = free_port()
    options = ["--store", str(store), "--admin-key", KEY, "--log-format", "json"]
    process = start_server(ROOT / "models" / "demo-moe", port, options, timeout, log=log)
    return Server(name, f"http://127.0.0.1:{port}", process, log)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def settle(servers: list[Server], timeout: float = 60) -> float:
    """Seconds until every server has read the same patterns and its routing has caught up with its store."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        reports = [s.admin("GET", "/store").json() for s in servers]
        same = all(r["patterns"] == reports[0]["patterns"] for r in reports)
        if same and all(r["routing_revision"] == r["revision"] and not r["relearning"] for r in reports):
            break
        time.sleep(0.1)
    else:
        print("  warning: the servers did not settle", file=sys.stderr)
    return time.perf_counter() - started


class Bundles:
    """Renamed copies of stored patterns as import bundles, read from a private copy of the store."""

    def __init__(self, source: Path) -> None:
        self.store = PatternStore(source, create=False)

    def of(self, pattern: str, name: str) -> bytes:
        copy = self.store.get(pattern)
        copy.name = name
        return pattern_to_bundle(copy)


def import_pattern(server: Server, bundles: Bundles, pattern: str, name: str) -> dict[str, Any]:
    bundle = bundles.of(pattern, name)
    return server.timed_admin("POST", "/patterns/import", f"import {name}", content=bundle)


@dataclass
class Churn:
    """Every CHURN_EVERY s: import `churn-N` (a copy of a stored pattern) on server N % 2 and delete
    `churn-(N-1)` on the other; N keeps counting across phases, so every name is new. The admin calls run
    in threads of their own: an import answers once routing knows its pattern, which under load takes
    longer than a churn step, and the steps must keep coming every few seconds."""

    servers: list[Server]
    bundles: Bundles
    step: int = 0
    previous: str | None = None  # the pattern to delete next
    calls: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    pending: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.stop, self.calls, self.pending = threading.Event(), [], []
        self.thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started, name = time.perf_counter(), f"churn-{self.step}"
            self._call(import_pattern, self._server(0), self.bundles, TASKS[self.step % len(TASKS)], name)
            self._delete_previous()
            self.previous, self.step = name, self.step + 1
            self.stop.wait(max(0.0, CHURN_EVERY - (time.perf_counter() - started)))

    def _call(self, function: Any, *args: Any) -> None:
        thread = threading.Thread(target=lambda: self.calls.append(function(*args)), daemon=True)
        thread.start()
        self.pending.append(thread)

    def _server(self, shift: int) -> Server:
        return self.servers[(self.step + shift) % 2]

    def _delete_previous(self) -> None:
        if self.previous is not None:  # imported on the other server
            self._call(self._server(1).timed_admin, "DELETE", f"/patterns/{self.previous}", f"delete {self.previous}")
            self.previous = None

    def finish(self) -> list[dict[str, Any]]:
        """Stop, delete the last pattern imported; the admin calls made since `start`."""
        self.stop.set()
        assert self.thread is not None
        self.thread.join()
        for thread in self.pending:
            thread.join()
        self._delete_previous()  # on the server that imported it, as in `_run`
        for thread in self.pending:
            thread.join()
        return self.calls


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def routed(client: openai.OpenAI, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One routed chat request: its status (an error's type when there is none), latency, routing headers."""
    started, headers, status = time.perf_counter(), {}, 200
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="demo-moe", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
        )
        raw.parse()
        headers = raw.headers
    except openai.APIStatusError as error:
        status, headers = error.status_code, error.response.headers
    except openai.APIError as error:
        status = type(error).__name__
    return {
        "status": status,
        "seconds": time.perf_counter() - started,
        "finished": time.time(),
        "pattern": headers.get("x-taskmoe-pattern"),
        "route": headers.get("x-taskmoe-route"),
    }


def route_kinds(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many answers had each `x-taskmoe-route` (its reason, without the probability or `was=`)."""
    return dict(Counter((r["route"] or "none").split(";")[0] for r in records))


def summarise(kind: str, records: list[dict[str, Any]], churn_calls: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["seconds"] for r in records] or [0.0, 0.0]
    return {
        "kind": kind,
        "requests": len(records),
        "statuses": dict(Counter(str(r["status"]) for r in records)),
        "non_200": sum(r["status"] != 200 for r in records),
        "max_ms": max(times) * 1000,
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": statistics.quantiles(times, n=100, method="inclusive")[98] * 1000,
        "routes": route_kinds(records),
        "served_by_churn_patterns": sum("churn-" in (r["pattern"] or "") for r in records),
        "churn_calls": churn_calls,
        "churn_calls_failed": sum(c["status"] not in (200, 201) for c in churn_calls),
    }


def load_phase(kind: str, servers: list[Server], prompts: list[str], seconds: float, churn: Churn) -> dict:
    """4 routed clients (2 per server) for `seconds`, with the churn thread running in a churn phase."""
    stop, records = threading.Event(), []

    def client_loop(server: Server, offset: int) -> None:
        client, i = client_for(server), offset
        while not stop.is_set():
            records.append(routed(client, prompts[i % len(prompts)], LOAD_MAX_TOKENS))
            i += 1

    threads = [threading.Thread(target=client_loop, args=(s, 7 * i)) for i, s in enumerate(servers * 2)]
    if kind == "churn":
        churn.start()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    calls = churn.finish() if kind == "churn" else []
    settle(servers)
    return summarise(kind, records, calls)


def load_result(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The phases, and the medians over the phases of each kind of their maxima and medians."""
    kinds, keys = ("quiet", "churn"), ("max_ms", "p50_ms")
    out = {f"{k}_median_{x}": statistics.median(p[x] for p in phases if p["kind"] == k) for k in kinds for x in keys}
    out["max_ratio_of_medians"] = out["churn_median_max_ms"] / out["quiet_median_max_ms"]
    overall = {k: max(p["max_ms"] for p in phases if p["kind"] == k) for k in kinds}
    out["overall_max_ratio"] = overall["churn"] / overall["quiet"]
    out["non_200"] = sum(p["non_200"] for p in phases)
    return {"phases": phases, **out}


def reproducer(servers: list[Server], bundles: Bundles, iterations: int, prompt: str) -> dict[str, Any]:
    """Import `upper-N`, send a routed "upper" query, delete `upper-N` one second later; N times."""
    server, client, other, rows = servers[0], client_for(servers[0]), client_for(servers[1]), []
    setup = [server.timed_admin("DELETE", "/patterns/upper", "delete upper")]
    settle(servers)
    for n in range(iterations):
        row: dict[str, Any] = {"import": import_pattern(server, bundles, "upper", f"upper-{n}")}
        row["routable_after_s"] = settle(servers)  # both servers route to it
        answer: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda into=answer: into.append(routed(client, prompt, REPRO_MAX_TOKENS)))
        thread.start()
        time.sleep(1.0)
        row["delete"], deleted_at = (
            server.timed_admin("DELETE", f"/patterns/upper-{n}", f"delete upper-{n}"),
            time.time(),
        )
        thread.join()
        row["request"] = answer[0] | {"finished_before_delete": answer[0]["finished"] < deleted_at}
        # the other server sees the delete at its next poll: until then it may route to upper-N, now gone
        row["after_delete_other"] = routed(other, prompt, REPRO_MAX_TOKENS)
        row["after_delete"] = routed(client, prompt, REPRO_MAX_TOKENS)
        rows.append(row)
    setup.append(import_pattern(server, bundles, "upper", "upper"))
    settle(servers)
    answers = [r[k] for r in rows for k in ("request", "after_delete_other", "after_delete")]
    return {
        "iterations": rows,
        "admin_setup": setup,
        "requests": len(answers),
        "non_200": sum(a["status"] != 200 for a in answers),
        "served_by_upper_n": {
            k: sum("upper-" in (r[k]["pattern"] or "") for r in rows) for k in ("request", "after_delete_other")
        },
        "routes": route_kinds(answers),
    }


def warning_delays(server: Server, files: dict[str, list[str]], since: float, offset: int) -> dict[str, Any]:
    """Per damaged file: seconds from the damage to the first `taskmoe.store` warning (logged after byte
    `offset`) naming it, by the log line's own time stamp; None: none within WARNING_SECONDS + 10 s."""
    found: dict[str, Any] = {}
    deadline = time.monotonic() + WARNING_SECONDS + 10
    while len(found) < len(files) and time.monotonic() < deadline:
        for entry in server.log_lines(offset):
            if entry.get("logger") != "taskmoe.store" or entry.get("level") != "warning":
                continue
            for file, names in files.items():
                if file not in found and any(name in entry["message"] for name in names):
                    logged = datetime.fromisoformat(entry["time"]).timestamp()
                    found[file] = {"seconds": round(logged - since, 3), "message": entry["message"]}
        time.sleep(0.1)
    return {file: found.get(file, {"seconds": None, "message": None}) for file in files}


def named_status(server: Server, pattern: str) -> dict[str, Any]:
    body = {"model": f"demo-moe@{pattern}", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    code = response.json().get("error", {}).get("code") if response.status_code != 200 else None
    return {"status": response.status_code, "code": code}


def damage(servers: list[Server], store: Path) -> dict[str, Any]:
    """Truncate sort's tensor file and overwrite spell.json while both servers run; then restore both."""
    tensor, document = next((store / "patterns").glob("sort.*.safetensors")), store / "patterns" / "spell.json"
    backups = {path: path.read_bytes() for path in (tensor, document)}
    offsets, since = {s.name: s.log.stat().st_size for s in servers}, time.time()
    with tensor.open("r+b") as handle:
        handle.truncate(len(backups[tensor]) // 2)
    document.write_text("{ this is not a pattern document")
    files = {tensor.name: [tensor.name, "sort.json"], document.name: [document.name]}  # sort's names its document
    out: dict[str, Any] = {"damaged": {"truncated": tensor.name, "overwritten": document.name}, "servers": {}}
    for server in servers:
        out["servers"][server.name] = {
            "warnings": warning_delays(server, files, since, offsets[server.name]),
            "admin_problems": {
                Path(p["file"]).name: p["reason"] for p in server.admin("GET", "/store").json()["problems"]
            },
            "named": {p: named_status(server, p) for p in ("sort", "spell")},
        }
    for path, data in backups.items():
        path.write_bytes(data)
    out["restored_after_s"] = settle(servers)
    for server in servers:
        out["servers"][server.name]["restored"] = {p: named_status(server, p) for p in ("sort", "spell")}
    per_server = out["servers"].values()
    delays = [w["seconds"] for s in per_server for w in s["warnings"].values()]
    out["warning_max_seconds"] = None if None in delays else max(delays)
    out["all_listed"] = all({"sort.json", "spell.json"} <= set(s["admin_problems"]) for s in per_server)
    damaged = {"status": 503, "code": "pattern_damaged"}
    out["all_503_pattern_damaged"] = all(n == damaged for s in per_server for n in s["named"].values())
    out["all_restored_200"] = all(n["status"] == 200 for s in per_server for n in s["restored"].values())
    return out


class EventReader:
    """The events of a streamed chat completion read off a raw socket (HTTP/1.1, chunked): its status, the
    content chunks and their text."""

    def __init__(self) -> None:
        self.raw, self.body, self.status, self.chunks, self.text = b"", b"", None, 0, ""
        self.head_done = False

    def feed(self, data: bytes) -> None:
        self.raw += data
        if not self.head_done:
            head, found, rest = self.raw.partition(b"\r\n\r\n")
            if not found:
                return
            self.status, self.raw, self.head_done = int(head.split(b" ", 2)[1]), rest, True
        while True:  # chunked transfer encoding: SIZE CRLF DATA CRLF
            line, found, rest = self.raw.partition(b"\r\n")
            if not found or len(rest) < int(line, 16) + 2:
                break
            size = int(line, 16)
            self.body, self.raw = self.body + rest[:size], rest[size + 2 :]
        *events, tail = self.body.decode(errors="replace").split("\n\n")
        self.body = tail.encode()
        for event in (e for e in events if e.startswith("data: {")):
            content = json.loads(event[6:])["choices"][0]["delta"].get("content")
            self.chunks, self.text = self.chunks + bool(content), self.text + (content or "")


def cut_stream(server: Server, body: dict[str, Any], k: int) -> dict[str, Any]:
    """Stream `body` on a raw socket and close it after k content chunks (0: right after sending). What had
    already arrived in the socket when the client closed was sent before the cut: it is read (without
    waiting) and counts as received."""
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    reader = EventReader()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        while k and reader.chunks < k:
            data = sock.recv(65536)
            if not data:
                break
            reader.feed(data)
        sock.setblocking(False)
        try:
            while k and (data := sock.recv(65536)):
                reader.feed(data)
        except BlockingIOError:
            pass
    return {"k": k, "status": reader.status, "chunks_received": reader.chunks, "text": reader.text}


def wait_ended(server: Server, before: dict[str, float], timeout: float = 30) -> dict[str, float]:
    """The metrics once the cut request has ended on the server: counted in `taskmoe_requests_total` (after
    `before`), with no generation active."""
    done = 'taskmoe_requests_total{route="/v1/chat/completions"'
    ended = sum(v for n, v in before.items() if n.startswith(done)) + 1
    deadline = time.monotonic() + timeout
    while True:
        after = server.metrics()
        idle = after.get("taskmoe_active_generations", 0) == 0
        if (idle and sum(v for n, v in after.items() if n.startswith(done)) >= ended) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


class Answers:
    """Greedy non-streamed answers by max_tokens, for turning the text a client received into tokens."""

    def __init__(self, server: Server) -> None:
        self.server, self.texts = server, {}

    def text(self, model: str, prompt: str, tokens: int) -> str:
        if (model, prompt, tokens) not in self.texts:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
            body |= {"max_tokens": tokens, "ignore_eos": True}
            answer = httpx.post(f"{self.server.url}/v1/chat/completions", json=body, timeout=120).json()
            self.texts[model, prompt, tokens] = answer["choices"][0]["message"]["content"]
        return self.texts[model, prompt, tokens]

    def tokens_behind(self, model: str, prompt: str, text: str) -> tuple[int, bool]:
        """The fewest tokens whose answer is as long as `text` (one character per token: never fewer than
        its length), and whether `text` is that answer's start (greedy decoding is deterministic)."""
        if not text:
            return 0, True
        tokens = len(text)
        while tokens < STREAM_MAX_TOKENS and len(self.text(model, prompt, tokens)) < len(text):
            tokens += 1
        return tokens, self.text(model, prompt, tokens).startswith(text)


def cut_streams(servers: list[Server], churn: Churn, count: int, prompts: list[tuple[str, str]]) -> dict:
    """`count` streams to the first server, one after another, cut at varied points, under churn."""
    server, rows = servers[0], []
    churn.start()
    for i in range(count):
        model, prompt = prompts[i % len(prompts)]
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "stream": True}
        body |= {"max_tokens": STREAM_MAX_TOKENS, "ignore_eos": True}
        before = server.metrics()
        row = cut_stream(server, body, 0 if i % 5 == 0 else (i * 7) % 10 + 1) | {"model": model, "prompt": prompt}
        after = wait_ended(server, before)
        for key, name in COUNTERS.items():
            row[key] = after.get(name, 0) - before.get(name, 0)
        rows.append(row)
    calls = churn.finish()
    settle(servers)
    answers = Answers(server)
    for row in rows:
        tokens, matches = answers.tokens_behind(row["model"], row["prompt"], row["text"])
        row |= {"tokens_behind_text": tokens, "text_matches_greedy": matches}
        row["tokens_after_cut"] = row["completion_tokens"] - tokens
        row["delta_minus_chunks_read"] = row["completion_tokens"] - row["k"]
    return {
        "streams": rows,
        "churn_calls": calls,
        "how_measured": TOKENS_NOTE,
        "max_tokens_after_cut": max(r["tokens_after_cut"] for r in rows),
        "within_target": sum(r["tokens_after_cut"] <= CUT_TOKENS for r in rows),
        "counted_once": sum(r["cancelled"] == 1 for r in rows),
        "max_delta_minus_chunks_read": max(r["delta_minus_chunks_read"] for r in rows),
    }


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: its threshold, what was measured, and whether it was met (at most the threshold for
    numbers, equal to it for the rest)."""
    load, repro, damaged, cuts = result["load"], result["reproducer"], result["damage"], result["cut_streams"]
    at_most = {
        "churn_vs_quiet_slowest_routed": (CHURN_RATIO, load["max_ratio_of_medians"]),
        "routed_non_200_under_churn": (0, load["non_200"]),
        "reproducer_non_200": (0, repro["non_200"]),
        "damaged_warning_seconds": (WARNING_SECONDS, damaged["warning_max_seconds"]),
        "cut_streams_max_tokens_after_cut": (CUT_TOKENS, cuts["max_tokens_after_cut"]),
    }
    equal = {
        "damaged_listed_by_admin_store": (True, damaged["all_listed"]),
        "damaged_named_503_pattern_damaged": (True, damaged["all_503_pattern_damaged"]),
        "restored_serve_200": (True, damaged["all_restored_200"]),
        "cut_streams_counted_once": (len(cuts["streams"]), cuts["counted_once"]),
    }
    out = {n: {"target": t, "measured": m, "pass": m is not None and m <= t} for n, (t, m) in at_most.items()}
    return out | {n: {"target": t, "measured": m, "pass": m == t} for n, (t, m) in equal.items()}


def table(result: dict[str, Any]) -> str:
    lines = ["phase    requests  non-200  p50 ms  p99 ms  max ms  routes"]
    for p in result["load"]["phases"]:
        routes = ", ".join(f"{k} {v}" for k, v in sorted(p["routes"].items()))
        numbers = f"{p['requests']:>8} {p['non_200']:>8} {p['p50_ms']:>7.0f} {p['p99_ms']:>7.0f} {p['max_ms']:>7.0f}"
        lines.append(f"{p['kind']:<8} {numbers}  {routes}")
    repro, cuts = result["reproducer"], result["cut_streams"]
    lines.append(f"\nreproducer: {repro['requests']} routed requests, routes {repro['routes']}")
    most = f"{cuts['max_tokens_after_cut']:.0f} (delta minus chunks read: {cuts['max_delta_minus_chunks_read']:.0f})"
    lines.append(
        f"cut streams: {len(cuts['streams'])}, {cuts['counted_once']} cancelled once, at most {most} after a cut"
    )
    lines += ["", f"{'target':<36} {'threshold':>10} {'measured':>10}  met"]
    for name, t in result["targets"].items():
        shown = f"{t['measured']:.2f}" if isinstance(t["measured"], float) else str(t["measured"])
        lines.append(f"{name:<36} {t['target']!s:>10} {shown:>10}  {'yes' if t['pass'] else 'NO'}")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40, help="length of each of the 4 load phases")
    parser.add_argument("--iterations", type=int, default=20, help="runs of the reproducer")
    parser.add_argument("--streams", type=int, default=50, help="streams cut by their clients")
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (to a temporary file)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/store_changes.json")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.iterations, args.streams = 6, 3, 10
    if args.out is None:
        quick = Path(tempfile.gettempdir()) / "taskmoe-bench-store-changes-quick.json"
        args.out = quick if args.quick else ROOT / "bench" / "results" / "store_changes.json"
    return args


def warm_up(servers: list[Server], prompts: list[str]) -> None:
    """Every task's pattern and the full model (the fallback) leased on both servers before timing."""
    for server in servers:
        client = client_for(server)
        for prompt in prompts[: len(TASKS)]:
            routed(client, prompt, LOAD_MAX_TOKENS)
        client.chat.completions.create(
            model="demo-moe@full", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )


def run(args: argparse.Namespace, work: Path, servers: list[Server]) -> dict[str, Any]:
    examples = {task: get_task(task).examples(8, 11) for task in TASKS}
    prompts = [examples[task][i].prompt for i in range(8) for task in TASKS]  # the tasks in turn
    bundles = Bundles(work / "source")
    churn = Churn(servers, bundles)
    warm_up(servers, prompts)
    phases = []
    for kind in ("quiet", "churn", "quiet", "churn"):
        phases.append(load_phase(kind, servers, prompts, args.seconds, churn))
        print(f"load, {kind}: {phases[-1]['requests']} requests, max {phases[-1]['max_ms']:.0f} ms", file=sys.stderr)
    result: dict[str, Any] = {"load": load_result(phases)}
    result["reproducer"] = reproducer(servers, bundles, args.iterations, examples["upper"][0].prompt)
    print(f"reproducer: {result['reproducer']['non_200']} answers other than 200", file=sys.stderr)
    result["damage"] = damage(servers, work / "patterns")
    print(f"damage: first warnings after at most {result['damage']['warning_max_seconds']} s", file=sys.stderr)
    named = [(f"demo-moe@{task}", examples[task][1].prompt) for task in STREAM_TASKS]
    result["cut_streams"] = cut_streams(servers, churn, args.streams, named)
    print(f"cut streams: at most {result['cut_streams']['max_tokens_after_cut']} tokens after a cut", file=sys.stderr)
    return result


def settings(args: argparse.Namespace, work: Path, wall: float) -> dict[str, Any]:
    """The arguments (`seconds`: per load phase), the constants above, where the server logs are, the wall time."""
    out = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    out |= {"servers": 2, "load_clients": 4, "store_poll_s": STORE_POLL, "churn_every_s": CHURN_EVERY}
    out["max_tokens"] = {"load": LOAD_MAX_TOKENS, "reproducer": REPRO_MAX_TOKENS, "streams": STREAM_MAX_TOKENS}
    return out | {"cpus": os.cpu_count(), "logs": str(work), "wall_s": wall}


def main() -> int:
    args = arguments()
    work = Path(tempfile.mkdtemp(prefix="taskmoe-store-changes-"))
    for copy in ("patterns", "source"):  # the servers' shared store; the bundles' source
        shutil.copytree(ROOT / "models" / "demo-moe" / "patterns", work / copy)
    servers: list[Server] = []
    started = time.perf_counter()
    try:
        for name in ("a", "b"):
            servers.append(start(name, work / "patterns", work / f"server-{name}.log"))
        print(f"servers ready in {time.perf_counter() - started:.0f} s; logs in {work}", file=sys.stderr)
        result = run(args, work, servers)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            stop(server.process)
    report = {"settings": settings(args, work, time.perf_counter() - started), **result}
    report["targets"] = targets(report)
    report["measured"] = measured()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0 if all(t["pass"] for t in report["targets"].values()) else 2


if __name__ == "__main__":
    raise SystemExit(main())
