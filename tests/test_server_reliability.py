"""Regression tests for the defects of issue #16, each over HTTP on a live tiny server:
burst admission, lone surrogates, non-ASCII keys, streams left before their first token,
slow clients, draining health and misleading error params."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import LiveServer, write_tiny_rrt

from server.settings import ServeSettings

BASE = {
    "block_size": 4,
    "kv_cache_memory": "4MiB",
    "max_model_len": 128,
    "threads": 1,
    "served_model_name": "tiny",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rrt(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def live(tiny_dir: Path) -> Iterator[LiveServer]:
    settings = ServeSettings(
        model=str(tiny_dir),
        header_timeout=1.0,
        body_timeout=1.0,
        max_queue=4,
        max_num_seqs=4,
        **BASE,
    )
    with LiveServer(settings) as server:
        yield server


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def counter(live: LiveServer, name: str) -> float:
    """A counter's total over all its labels, from /metrics."""
    text = httpx.get(f"{live.url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def hold_engine(live: LiveServer) -> threading.Event:
    """Make the engine's next step wait until the returned event is set (at most 10 s)."""
    engine = live.engine.engine
    step, release = engine.step, threading.Event()

    def held_step() -> object:
        release.wait(10)
        engine.step = step  # type: ignore[method-assign]
        return step()

    engine.step = held_step  # type: ignore[method-assign]
    return release


def peak_waiting(live: LiveServer) -> Callable[[], int]:
    """Instrument the engine: the most sequences ever seen waiting right after an add (the
    only place, preemption aside, where the waiting queue grows)."""
    engine = live.engine.engine
    add = engine.add_request
    peak = [0]

    def counting_add(*args: object) -> None:
        add(*args)  # type: ignore[arg-type]
        peak[0] = max(peak[0], len(engine.scheduler.waiting))

    engine.add_request = counting_add  # type: ignore[method-assign]
    return lambda: peak[0]


def wait_idle(live: LiveServer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while live.engine.engine.scheduler.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not live.engine.engine.scheduler.requests


# -- 1: bursts respect --max-queue in sequences -------------------------------------------


def test_a_burst_never_queues_more_than_max_queue_sequences(live: LiveServer) -> None:
    peak = peak_waiting(live)
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 4, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            single = [c.post("/v1/completions", json=body) for _ in range(40)]
            fan = {**body, "prompt": ["the dog"] * 8, "n": 16}
            return await asyncio.gather(*single, c.post("/v1/completions", json=fan))

    responses = asyncio.run(burst())
    wait_idle(live)
    assert peak() <= 4
    assert {r.status_code for r in responses} <= {200, 429}
    refused = [r for r in responses if r.status_code == 429]
    assert refused and responses[-1].status_code == 429  # 128 sequences never fit in 4
    for r in refused:
        assert error_of(r, 429)["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1


# -- 2, 9: errors name the right param and never 500 ---------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_in_chat_content_is_400(live: LiveServer, stream: bool) -> None:
    flag = "true" if stream else "false"
    raw = '{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}],"stream":' + flag + "}"
    resp = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=raw.encode(),
        headers={"content-type": "application/json"},
    )
    assert error_of(resp, 400)["param"] == "messages.0.content"


def test_a_json_syntax_error_names_no_param(live: LiveServer) -> None:
    resp = httpx.post(
        f"{live.url}/v1/completions",
        content=b'{"model": "tiny", "prompt": "hi",,}',
        headers={"content-type": "application/json"},
    )
    error = error_of(resp, 400)
    assert error["param"] is None and "JSON" in error["message"]


def test_an_over_long_chat_blames_messages(live: LiveServer) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "the " * 130}]}
    assert error_of(httpx.post(f"{live.url}/v1/chat/completions", json=body), 400)["param"] == (
        "messages"
    )


@pytest.mark.parametrize(
    ("path", "field", "value", "param"),
    [
        ("/v1/completions", "max_tokens", True, "max_tokens"),
        ("/v1/completions", "n", True, "n"),
        ("/v1/completions", "logprobs", True, "logprobs"),
        ("/v1/completions", "seed", False, "seed"),
        ("/v1/completions", "prompt", [True, 5], "prompt"),
        ("/v1/completions", "temperature", True, "temperature"),
        ("/v1/chat/completions", "max_completion_tokens", True, "max_completion_tokens"),
        ("/v1/chat/completions", "max_tokens", True, "max_tokens"),
    ],
)
def test_booleans_are_not_numbers(
    live: LiveServer, path: str, field: str, value: object, param: str
) -> None:
    body: dict[str, object] = {"model": "tiny", field: value}
    if field != "prompt":
        body["prompt" if path == "/v1/completions" else "messages"] = (
            "hi" if path == "/v1/completions" else [{"role": "user", "content": "hi"}]
        )
    assert error_of(httpx.post(f"{live.url}{path}", json=body), 400)["param"] == param


# -- 3: non-ASCII Authorization headers and keys ------------------------------------------


def test_non_ascii_keys_and_headers_are_401_or_accepted(tiny_dir: Path) -> None:
    settings = ServeSettings(model=str(tiny_dir), api_key="sésame", **BASE)
    with LiveServer(settings) as server:
        url = f"{server.url}/v1/models"
        for given in ("Bearer s\xe9same".encode("latin-1"), "Bearer ключ".encode(), b"Bearer x"):
            assert error_of(httpx.get(url, headers={"Authorization": given}), 401)["code"] == (
                "invalid_api_key"
            )
        right = {"Authorization": "Bearer sésame".encode()}
        assert httpx.get(url, headers=right).status_code == 200


# -- 4: a stream left before its first token is aborted ------------------------------------


def test_a_stream_left_before_its_first_token_is_aborted(live: LiveServer) -> None:
    """The engine is held on the request's first (prefill) step; once the client has gone,
    the request must be aborted before the step that would sample its first token."""
    tokens_before = counter(live, "loopserve:generation_tokens_total")
    release = hold_engine(live)
    try:
        body = {
            "model": "tiny",
            "prompt": "the sun",
            "max_tokens": 100,
            "ignore_eos": True,
            "stream": True,
        }
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.3)
        time.sleep(1.5)  # the server polls for the disconnect every 0.5 s
    finally:
        release.set()
    wait_idle(live)
    assert counter(live, "loopserve:generation_tokens_total") == tokens_before


# -- 5: slow clients ----------------------------------------------------------------------


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``within`` s (None: still open)."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    return got


def test_idle_and_half_sent_headers_are_closed(live: LiveServer) -> None:
    idle = socket.create_connection(("127.0.0.1", live.port))
    half = socket.create_connection(("127.0.0.1", live.port))
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    with idle, half:
        assert _closed_by_server(idle, 5) == b""
        assert _closed_by_server(half, 5) is not None


def test_a_half_sent_body_gets_408(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"model": '
        )
        answer = _closed_by_server(sock, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"code":"body_timeout"' in answer


def test_health_answers_with_hundreds_of_idle_connections(live: LiveServer) -> None:
    socks = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(300)]
    try:
        assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


# -- 6: draining is visible on /health ----------------------------------------------------


def test_health_is_503_while_draining(tiny_dir: Path) -> None:
    with LiveServer(ServeSettings(model=str(tiny_dir), **BASE)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        release = hold_engine(server)  # an in-flight request keeps the drain going
        body = {"model": "tiny", "prompt": "the sun", "max_tokens": 5}
        client = threading.Thread(
            target=lambda: httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        )
        client.start()
        drain = threading.Thread(target=asyncio.run, args=(server.engine.shutdown(30),))
        try:
            while not server.engine.num_waiting + server.engine.num_running:
                time.sleep(0.01)
            drain.start()
            time.sleep(0.2)
            assert server.engine.alive
            assert error_of(httpx.get(f"{server.url}/health"), 503)["code"] == "shutting_down"
        finally:
            release.set()
            client.join(30)
            drain.join(30)
