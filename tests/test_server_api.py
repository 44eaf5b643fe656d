"""The OpenAI-compatible API on a live uvicorn with a tiny random recursive model, driven by
the official ``openai`` client (and httpx where the client hides the wire)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import LiveServer, write_tiny_rrt

from server.settings import ServeSettings

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rrt(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def live(tiny_dir: Path) -> Iterator[LiveServer]:
    settings = ServeSettings(
        model=str(tiny_dir),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=128,
        max_body_bytes="64KiB",
        threads=1,
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def metrics(live: LiveServer) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics, keyed by (name, sorted labels); it must parse."""
    text = httpx.get(f"{live.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(live: LiveServer, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": "tiny", **labels}.items())))
    return metrics(live).get(key, 0.0)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# -- completions -------------------------------------------------------------------------


def test_completion_counts_and_usage(live: LiveServer, client: openai.OpenAI) -> None:
    prompt = "the cat and the dog"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, **GREEDY)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(live.tokenizer(prompt)["input_ids"])
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    assert 1 <= out.usage.model_extra["mean_loops_per_token"] <= 2


def test_prompt_forms_and_n(live: LiveServer, client: openai.OpenAI) -> None:
    ids = live.tokenizer("hello world")["input_ids"]
    by_text = client.completions.create(model="tiny", prompt="hello world", max_tokens=5, **GREEDY)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(
        model="tiny", prompt=["hello world", "the sun"], n=2, max_tokens=5, **GREEDY
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text
    nested = client.completions.create(model="tiny", prompt=[ids, ids[:1]], max_tokens=5, **GREEDY)
    assert nested.choices[0].text == by_text.choices[0].text and len(nested.choices) == 2
    assert nested.usage.prompt_tokens == len(ids) + 1
    assert nested.usage.completion_tokens == 10


def test_default_max_tokens_is_clamped_to_the_context(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="the " * 124, **GREEDY)  # 16 by default
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"


def test_streaming_matches_whole(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "a big red dog", "max_tokens": 10, **GREEDY}
    whole = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "the moon", "max_tokens": 12, "n": 3, "temperature": 1.0}
    kw["extra_body"] = {"ignore_eos": True}
    first = [c.text for c in client.completions.create(seed=7, **kw).choices]
    again = [c.text for c in client.completions.create(seed=7, **kw).choices]
    other = [c.text for c in client.completions.create(seed=8, **kw).choices]
    assert first == again and first != other
    assert len(set(first)) > 1  # the n samples differ from each other


def test_stop_string(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "you and me", "max_tokens": 16, **GREEDY}
    words = client.completions.create(**kw).choices[0].text.split()
    stop = next(w for w in words[2:] if w not in words[:2])
    out = client.completions.create(stop=[stop], **kw).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text.split()
    assert out.text.split() == words[: words.index(stop)]


def test_logprobs_and_echo(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny", prompt="blue sun", max_tokens=6, logprobs=3, **GREEDY
    ).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)
    greedy_best = [max(top.values()) for top in lp.top_logprobs]
    assert lp.token_logprobs == pytest.approx(greedy_best)
    echoed = client.completions.create(
        model="tiny", prompt="blue sun", max_tokens=6, echo=True, **GREEDY
    )
    assert echoed.choices[0].text == "blue sun" + out.text


@pytest.mark.parametrize(
    "extreme",
    [{"top_p": 1e-100}, {"temperature": 1e-7}, {"temperature": 1e300}, {"top_k": 10**30}],
)
def test_extreme_sampling_values_keep_the_engine_alive(
    live: LiveServer, client: openai.OpenAI, extreme: dict
) -> None:
    kw = {"temperature": 1.0, "top_p": 1.0, **extreme}
    top_k = kw.pop("top_k", 0)
    out = client.completions.create(
        model="tiny", prompt="hello", max_tokens=3, extra_body={"top_k": top_k, "min_p": 0.5}, **kw
    )
    assert out.usage.completion_tokens >= 1 and live.engine.alive


# -- chat --------------------------------------------------------------------------------


def test_chat_whole_and_streamed(live: LiveServer, client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "you are a cat"},
        {"role": "user", "content": "hello"},
    ]
    kw = {"model": "tiny", "messages": messages, "max_completion_tokens": 7, **GREEDY}
    whole = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    rendered = live.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert whole.usage.prompt_tokens == len(
        live.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )
    assert whole.usage.completion_tokens == len(choice.logprobs.content) == 7
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_max_tokens_and_n(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the dog"}], max_tokens=3, n=2, **GREEDY
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 6


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"101": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 101}}, "logit_bias"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [101]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
        ("/v1/completions", {"prompt": "hi", "guided_json": {}}, "guided_json"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": [5, 1000]}, "prompt"),
        ("/v1/completions", {"prompt": "the " * 130}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "x", "content": "a"}]}, "messages.0.role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
            "top_logprobs",
        ),
    ],
)
def test_invalid_requests_are_400(live: LiveServer, path: str, body: dict, param: str) -> None:
    resp = httpx.post(f"{live.url}{path}", json={"model": "tiny", **body})
    assert assert_error(resp, 400, param)["type"] == "invalid_request_error"


def test_malformed_json_is_400(live: LiveServer) -> None:
    resp = httpx.post(
        f"{live.url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert_error(resp, 400)


def test_unknown_model_and_route_are_404(live: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    resp = httpx.post(f"{live.url}/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert assert_error(resp, 404, "model")["code"] == "model_not_found"
    assert_error(httpx.get(f"{live.url}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{live.url}/v1/models/nope"), 404)


def test_oversized_body_is_413(live: LiveServer) -> None:
    resp = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "a " * 40_000})
    assert_error(resp, 413)


def test_full_queue_is_429_with_retry_after(live: LiveServer, client: openai.OpenAI) -> None:
    live.engine.max_queue = 0
    try:
        resp = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "hi"})
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "a"}], stream=True
            )
    finally:
        live.engine.max_queue = 256
    assert assert_error(resp, 429)["type"] == "rate_limit_error"
    assert int(resp.headers["retry-after"]) >= 1


def test_api_key_and_dead_engine(tiny_dir: Path) -> None:
    settings = ServeSettings(
        model=str(tiny_dir),
        served_model_name="tiny",
        api_key="sesame",
        block_size=4,
        kv_cache_memory="1MiB",
        max_model_len=64,
    )
    with LiveServer(settings) as server:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert_error(httpx.post(f"{server.url}/v1/completions", json=body), 401)
        wrong = {"Authorization": "Bearer open"}
        assert_error(httpx.get(f"{server.url}/v1/models", headers=wrong), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(**body).usage.completion_tokens >= 1
        assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key
        alive = 'loopserve:engine_alive{model_name="tiny"} 1.0'
        assert alive in httpx.get(f"{server.url}/metrics").text
        asyncio.run(server.engine.shutdown(grace_seconds=0))
        assert_error(httpx.get(f"{server.url}/health"), 503)
        dead = 'loopserve:engine_alive{model_name="tiny"} 0.0'
        assert dead in httpx.get(f"{server.url}/metrics").text
        resp = httpx.post(
            f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer sesame"}
        )
        assert assert_error(resp, 503)["type"] == "service_unavailable"
        assert "retry-after" in resp.headers


# -- streams, disconnects, metrics --------------------------------------------------------


def test_disconnect_aborts_and_frees_kv(live: LiveServer) -> None:
    body = {
        "model": "tiny",
        "prompt": "the sun",
        "max_tokens": 120,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            assert next(lines).startswith("data: ")
            next(lines)
        assert sample(live, "loopserve:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sample(live, "loopserve:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.05)
    assert sample(live, "loopserve:kv_cache_usage_perc") == 0
    assert sample(live, "loopserve:num_requests_running") == 0
    assert not live.engine.engine.scheduler.requests


def test_disconnect_while_waiting_for_a_whole_response_aborts(live: LiveServer) -> None:
    done = sample(live, "loopserve:request_success_total", finished_reason="length")
    body = {"model": "tiny", "prompt": ["the sun"] * 8, "n": 4, "max_tokens": 120}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json={**body, "ignore_eos": True}, timeout=0.3)
    deadline = time.monotonic() + 10
    while live.engine.engine.scheduler.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live.engine.engine.scheduler.requests
    assert sample(live, "loopserve:kv_cache_usage_perc") == 0
    assert sample(live, "loopserve:request_success_total", finished_reason="length") == done


def test_32_concurrent_streams_complete_in_order(live: LiveServer) -> None:
    words = ["cat", "dog", "sun", "moon", "red", "blue", "green", "big", "small", "fast"]
    prompts = [f"{words[i % 10]} {words[(i * 3) % 10]} the {words[i // 10]}" for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)

    async def one(prompt: str, stream: bool) -> list[str]:
        """The generated tokens, in the order the stream delivered them."""
        kw = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "logprobs": 0, **GREEDY}
        if not stream:
            return (await aclient.completions.create(**kw)).choices[0].logprobs.tokens
        chunks = await aclient.completions.create(stream=True, **kw)
        return [t async for c in chunks for t in c.choices[0].logprobs.tokens]

    async def run() -> tuple[list[list[str]], list[list[str]]]:
        streamed = await asyncio.gather(*(one(p, True) for p in prompts))
        whole = await asyncio.gather(*(one(p, False) for p in prompts))
        await aclient.close()
        return streamed, whole

    streamed, whole = asyncio.run(run())
    assert streamed == whole
    assert all(len(tokens) == 12 for tokens in streamed)


def test_metrics_parse_and_move(live: LiveServer, client: openai.OpenAI) -> None:
    before = metrics(live)
    client.completions.create(model="tiny", prompt="the dog", max_tokens=4, **GREEDY)
    after = metrics(live)
    label = (("model_name", "tiny"),)

    def moved(name: str, labels: tuple = label) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("loopserve:prompt_tokens_total") == 2
    assert moved("loopserve:generation_tokens_total") == 4
    assert moved("loopserve:request_success_total", (("finished_reason", "length"), *label)) == 1
    assert moved("loopserve:time_to_first_token_seconds_count") == 1
    assert moved("loopserve:e2e_request_latency_seconds_count") == 1
    assert moved("loopserve:inter_token_latency_seconds_count") == 3
    assert moved("loopserve:loops_per_token_count") == 4
    assert moved("loopserve:exits_total", (("depth", "1"), *label)) == 4  # exits off: last loop
    assert moved("loopserve:step_rows_count", (("depth", "0"), *label)) >= 4
    assert moved("loopserve:step_duration_seconds_count") >= 8
    assert moved("loopserve:request_queue_time_seconds_count") == 1
    for name in ("num_requests_running", "num_requests_waiting", "num_preemptions_total"):
        assert (f"loopserve:{name}", label) in after


def test_early_exit_on_request(live: LiveServer, client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny",
        prompt="the dog",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "exit_threshold": 0.0},
    )
    assert out.usage.model_extra["mean_loops_per_token"] == pytest.approx(1.0)
    assert sample(live, "loopserve:kv_fills_total", depth="1") >= 7


def test_models_health_version(live: LiveServer, client: openai.OpenAI) -> None:
    (card,) = client.models.list().data
    extra = card.model_extra
    assert card.id == "tiny" and extra["loops"] == 2 and extra["ranks"]["q"] == 4
    assert extra["parameters"] == live.info.parameters > 0
    assert extra["early_exit"]["enabled"] is False
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    assert json.loads(httpx.get(f"{live.url}/version").text)["version"]
