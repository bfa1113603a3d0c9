"""`taskmoe serve` in its own process on loopback, for the scripts that measure it through HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    model: Path, port: int, options: Sequence[str] = (), timeout: float = 180, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`taskmoe serve --model MODEL --port PORT OPTIONS...`, returned once `/ready` answers 200; its stderr (the
    server's log) goes to `log` when given."""
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", str(port), *options]
    if log is not None:
        with log.open("wb") as sink:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink)
    else:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {_log_tail(process, log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not become ready in {timeout:.0f} s: {_log_tail(process, log)}")


def _log_tail(process: subprocess.Popen[bytes], log: Path | None) -> str:
    if log is not None:
        return log.read_text(errors="replace")[-2000:]
    assert process.stderr is not None
    return process.stderr.read().decode(errors="replace")[-2000:] if process.poll() is not None else ""


def scrape(url: str) -> dict[str, float]:
    """Every sample of `/metrics`, by its name as written (with its labels, if any)."""
    lines = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text.splitlines()
    return {
        name: float(value) for name, _, value in (line.rpartition(" ") for line in lines if line and line[0] != "#")
    }
