"""The bench client against servers: a fake OpenAI server that fails in every way a real one
can (the run counts each failure and exits 0), a live loopserve on a tiny model, and the
compare driver starting two tiny loopserve servers."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from server_support import LiveServer, free_port, write_tiny_rrt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from benchmarks.client.datasets import BenchError
from benchmarks.server_process import ServerProcess
from loopserve.cli import main
from server.settings import ServeSettings

WORDS = ["the", " cat", " is", " red"]


def run(command: str) -> int:
    """``loopserve`` with a shell-quoted argument string (test paths carry no spaces)."""
    return main(shlex.split(command))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(prompt: str) -> AsyncIterator[str]:
    """Four tokens, 10 ms apart; 'drop' dies after two, 'nousage' omits the usage chunk."""
    for i, word in enumerate(WORDS):
        if prompt == "drop" and i == 2:
            raise ConnectionResetError("fake server drops the connection")
        await asyncio.sleep(0.01)
        yield _event({"choices": [{"index": 0, "text": word, "finish_reason": None}]})
    if prompt == "error-event":
        yield _event({"error": {"message": "engine died", "code": 500}})
    elif prompt != "nousage":
        yield _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    yield "data: [DONE]\n\n"


async def _completions(request: Request) -> Response:
    prompt = (await request.json())["prompt"]
    if prompt == "500":
        return JSONResponse({"error": {"message": "internal"}}, status_code=500)
    if prompt == "429":
        return JSONResponse({"error": {"message": "queue full"}}, status_code=429)
    if prompt == "hang":
        await asyncio.sleep(3)
    return StreamingResponse(_stream(prompt), media_type="text/event-stream")


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/v1/completions", _completions, methods=["POST"]),
            Route("/v1/models", _models),
        ]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_failures_are_counted_not_fatal(fake_url: str, tmp_path: Path) -> None:
    prompts = ["ok", "500", "429", "drop", "hang", "error-event", "nousage", "ok"]
    dataset = tmp_path / "p.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    result, plot = tmp_path / "r.json", tmp_path / "r.png"
    rc = run(
        f"bench serve --base-url {fake_url}/v1 --dataset jsonl --dataset-path {dataset} "
        f"--timeout 1 --max-concurrency 4 --disable-tqdm --save-result "
        f"--result-filename {result} --plot {plot}"
    )
    assert rc == 0
    data = json.loads(result.read_text())
    assert data["model_id"] == "fake"  # found through /v1/models
    assert (data["completed"], data["failed"]) == (3, 5)
    assert data["errors_by_kind"] == {
        "HTTP 500": 1,
        "HTTP 429": 1,
        "connection": 1,
        "timeout": 1,
        "bad stream": 1,
    }
    ok = [i for i, e in enumerate(data["errors"]) if not e]
    assert ok == [0, 6, 7]
    assert [data["output_lens"][i] for i in ok] == [4, 4, 4]  # usage, or one per chunk
    assert data["input_lens"][0] == 3  # the server's prompt count wins
    assert all(len(data["itls"][i]) == 3 for i in ok)
    assert data["generated_texts"][0] == "the cat is red"
    assert data["total_output_tokens"] == 12
    assert plot.stat().st_size > 0


def test_max_duration_cuts_the_run(fake_url: str, tmp_path: Path) -> None:
    dataset = tmp_path / "p.jsonl"
    dataset.write_text('"hang"\n"hang"\n"ok"')
    result = tmp_path / "r.json"
    start = time.monotonic()
    rc = run(
        f"bench serve --base-url {fake_url} --model fake --dataset jsonl --dataset-path {dataset} "
        f"--max-duration 0.5 --max-concurrency 2 --disable-tqdm --save-result "
        f"--result-filename {result}"
    )
    assert rc == 0 and time.monotonic() - start < 2.5
    data = json.loads(result.read_text())
    assert data["errors_by_kind"] == {"max duration": 3}


def test_bad_arguments_exit_2(
    fake_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(f"bench serve --base-url {fake_url} --model fake") == 2
    assert "random prompts need --tokenizer" in capsys.readouterr().err
    dataset = tmp_path / "p.jsonl"
    dataset.write_text('"hello"')
    base = "bench serve --base-url http://127.0.0.1:9 --dataset jsonl --dataset-path"
    assert run(f"{base} {dataset}") == 2  # nothing listens there: no model list
    assert "cannot list the models" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rrt(tmp_path_factory.mktemp("bench"))


def test_against_live_loopserve(tiny_dir: Path, tmp_path: Path) -> None:
    """vLLM's spellings, no --tokenizer (the server's /v1/models names the model directory),
    and --save-result writing vLLM's keys under vLLM's file name."""
    settings = ServeSettings(
        model=str(tiny_dir), kv_cache_memory="4MiB", block_size=4, max_model_len=128, threads=1
    )
    with LiveServer(settings) as live:
        rc = run(
            f"bench serve --base-url {live.url} --num-prompts 6 --dataset-name random "
            "--random-input-len 8 --random-output-len 6 --ignore-eos --request-rate 50 "
            "--max-concurrency 3 --backend openai-chat --goodput ttft:60000 --disable-tqdm "
            f"--save-result --result-dir {tmp_path} --label tiny-chat"
        )
    assert rc == 0
    (result,) = tmp_path.glob("tiny-chat-50qps-concurrency3-rrt-*.json")
    data = json.loads(result.read_text())
    assert (data["completed"], data["failed"]) == (6, 0)
    assert data["label"] == "tiny-chat" and data["backend"] == "openai-chat"
    assert data["output_lens"] == [6] * 6  # ignore_eos honoured, counted from the usage
    assert data["input_lens"][0] > 8  # the chat template's tokens are counted by the server
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert all(len(itl) == 5 for itl in data["itls"])
    assert data["mean_tpot_ms"] > 0 and data["p99_e2el_ms"] >= data["median_e2el_ms"]
    assert len(data["start_times"]) == 6 and sorted(data["start_times"]) == data["start_times"]
    assert data["latencies"] == pytest.approx(
        [t + sum(i) for t, i in zip(data["ttfts"], data["itls"], strict=True)], abs=0.05
    )
    assert 1 <= data["max_concurrent_requests"] <= 6  # vLLM's: requests during one second
    assert 1 <= data["max_output_tokens_per_s"] <= 36


def test_compare_on_tiny_models(tiny_dir: Path, fake_url: str, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rc = run(
        f"bench compare --vanilla-model {tiny_dir.parent / 'hf'} --recursive-model {tiny_dir} "
        "--concurrency 1 2 --num-prompts 3 --input-len 6 --output-len 4 --ignore-eos "
        "--quality-prompts 2 --quality-len 4 --threads 1 "
        "--serve-arg='--kv-cache-memory 4MiB --block-size 4' --startup-timeout 120 "
        f"--disable-tqdm --out {out} --peer fake={fake_url}"
    )
    assert rc == 0
    table = (out / "compare.md").read_text()
    assert table.count("| loopserve-vanilla-seq |") == 2
    assert table.count("| loopserve-rrt-depth |") == 2
    report = json.loads((out / "compare.json").read_text())
    vanilla, recursive, fake = report["servers"]
    assert all(row["completed"] == 3 and row["failed"] == 0 for row in vanilla["rows"])
    assert vanilla["rows"][0]["agreement_exact"] == 1.0  # the reference agrees with itself
    assert 0.0 <= recursive["rows"][0]["agreement_prefix"] <= 1.0
    assert "--batching depth" in recursive["command"]
    assert fake["command"] is None and fake["quality_texts"] == ["the cat is red"] * 2
    assert (out / "compare.png").stat().st_size > 0


def test_compare_refuses_a_peer_command_without_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("bench compare --vanilla-model x --peer-command p=serve") == 2
    assert "needs --peer NAME=URL" in capsys.readouterr().err


def test_a_server_that_dies_at_start_is_an_error(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    server = ServerProcess(command, "http://127.0.0.1:9", tmp_path / "log")
    with server, pytest.raises(BenchError, match=r"exited \(3\)"):
        server.wait_ready(10)
