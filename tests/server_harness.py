"""A real uvicorn server on loopback, in a thread of the test process, for end-to-end tests."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.config import ServerConfig

from conftest import DEMO_MOE


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    config: ServerConfig

    @property
    def runtime(self):
        return self.app.state.runtime

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one Prometheus sample from /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def copy_demo_store(tmp: Path) -> Path:
    return Path(shutil.copytree(DEMO_MOE / "patterns", tmp / "patterns"))


@contextmanager
def running_server(config: ServerConfig, ready_timeout: float = 120) -> Iterator[RunningServer]:
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server did not become ready: {getattr(app.state, 'load_error', None)}")
            time.sleep(0.1)
        yield RunningServer(url, app, config)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
