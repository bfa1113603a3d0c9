"""`taskmoe serve` as `make serve` runs it: a process of its own, Python's default warning filters, the
official OpenAI client. Its log must carry no warning (a deprecation there is a fresh machine's next
break), and it must answer both ways, streamed and not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from conftest import DEMO_MOE, ROOT
from server_harness import copy_demo_store

pytestmark = pytest.mark.slow
QUESTION = "Translate 'red cat' into Zorbish."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"taskmoe serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError("taskmoe serve did not become ready")


def test_served_process_answers_and_logs_no_warning(tmp_path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}  # the user's defaults
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(DEMO_MOE), "--port", str(port)]
    command += ["--store", str(copy_demo_store(tmp_path)), "--store-poll", "0"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": QUESTION}]
        whole = client.chat.completions.create(model="demo-moe", messages=messages, temperature=0)
        stream = client.chat.completions.create(model="demo-moe", messages=messages, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    finally:
        process.terminate()
        _, log = process.communicate(timeout=60)
    assert whole.choices[0].message.content == streamed == "vel mip"
    assert "Warning" not in log, log
