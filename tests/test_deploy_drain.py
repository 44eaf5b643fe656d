"""SIGTERM drains a real ``loopserve serve`` process: ``/health`` and new requests get 503
(+ Retry-After) while the listening socket stays open, an in-flight stream runs to its last
token and ``[DONE]``, and the process exits 0 within the grace + 1 s — what a container
runtime or Kubernetes relies on. Also: idle connections cannot starve ``/health`` of file
descriptors."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import tiny_llama_config, write_hf_model
from server_support import free_port, write_tiny_tokenizer

from model.build import convert_checkpoint
from model.config import LINEAR_MODULES

CONTEXT = 1024
STREAM_TOKENS = 1000  # a couple of seconds of decoding on the tiny model: the drain window


def write_long_context_model(root: Path) -> Path:
    src, out = root / "hf", root / "rrt"
    src.mkdir()
    write_hf_model(src, tiny_llama_config(max_position_embeddings=CONTEXT))
    write_tiny_tokenizer(src)
    ranks = dict.fromkeys(LINEAR_MODULES, 4)
    convert_checkpoint(src, out, loops=2, init="average", ranks=ranks, evaluate=False)
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"loopserve serve exited {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("loopserve serve did not become healthy")


def stream_completion(url: str, model: str, first_token: threading.Event) -> list[dict]:
    events = []
    body = {
        "model": model,
        "prompt": "hello world",
        "max_tokens": STREAM_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                first_token.set()
                data = line.removeprefix("data: ")
                events.append({"done": True} if data == "[DONE]" else json.loads(data))
    return events


def serve_command(model: Path, port: int, grace: float) -> list[str]:
    serve = Path(sys.executable).parent / "loopserve"
    return [
        str(serve),
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--threads",
        "1",
        "--shutdown-grace",
        str(grace),
        "--kv-cache-memory",
        "16MiB",
    ]


def test_sigterm_drains_in_flight_streams_then_exits_0(tmp_path: Path) -> None:
    model = write_long_context_model(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(serve_command(model, port, 30), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        first_token = threading.Event()
        result: list[list[dict]] = []
        client = threading.Thread(
            target=lambda: result.append(stream_completion(url, "rrt", first_token))
        )
        client.start()
        assert first_token.wait(30), "the stream never started"

        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # the drain starts on uvicorn's next tick (0.1 s)
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": "rrt", "prompt": "the", "max_tokens": 1},
                timeout=10,
            )
            if r.status_code != 200 or time.monotonic() > deadline:
                break
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit()
        assert client.is_alive(), "the in-flight stream ended before the drain was seen"

        client.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
    events = result[0]
    assert events[-1] == {"done": True}, output[-2000:]
    choices = [e["choices"][0] for e in events[:-1]]
    assert choices[-1]["finish_reason"] == "length"
    assert "error" not in json.dumps(events)
    assert "draining" in output and "Finished server process" in output


def test_health_turns_503_at_sigterm_and_the_exit_keeps_the_grace(tmp_path: Path) -> None:
    """Streams longer than the grace are cut at the grace; the process is gone 1 s later."""
    model = write_long_context_model(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    grace = 1.0
    proc = subprocess.Popen(serve_command(model, port, grace), stdout=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        started = [threading.Event() for _ in range(4)]
        clients = [
            threading.Thread(target=stream_completion, args=(url, "rrt", e), daemon=True)
            for e in started
        ]
        for c in clients:
            c.start()
        assert all(e.wait(30) for e in started), "the streams never started"
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        health = None
        while time.monotonic() < signalled + grace:
            health = httpx.get(f"{url}/health", timeout=5)
            if health.status_code == 503:
                break
        assert health is not None and health.status_code == 503, "/health never turned 503"
        assert health.json()["error"]["code"] == "shutting_down"
        assert proc.wait(grace + 5) == 0
        assert time.monotonic() - signalled <= grace + 1.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_health_answers_past_a_low_fd_limit_of_idle_connections(tmp_path: Path) -> None:
    """Started with a soft limit of 256 descriptors, 400 idle connections do not starve
    /health: serve raises its soft limit to the hard one, and drops connections that never
    send a request after the header timeout."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024:
        pytest.skip("the hard descriptor limit here is too low to open 400 connections")
    model = write_long_context_model(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LOOPSERVE_HEADER_TIMEOUT": "2"}
    proc = subprocess.Popen(
        serve_command(model, port, 1),
        stdout=subprocess.DEVNULL,
        env=env,
        preexec_fn=_low_fd_limit,
    )
    socks: list[socket.socket] = []
    try:
        wait_healthy(url, proc)
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        socks[0].settimeout(10)
        assert socks[0].recv(1) == b"", "an idle connection outlived the header timeout"
    finally:
        for s in socks:
            s.close()
        proc.kill()
        proc.wait()
