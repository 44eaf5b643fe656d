"""A bad-input battery over HTTP (issue #16): several hundred malformed, out-of-range and
unsupported requests against both generation endpoints, streamed and not, each of which
must get an OpenAI-shaped 4xx naming the offending ``param`` (never a 5xx); and seeded
random valid requests, each of whose 200s must honour what it asked for."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import httpx
import pytest
from server_support import LiveServer, write_tiny_rrt

from server.settings import ServeSettings

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
RAW = object()  # marks a value spliced into the body as raw JSON text

# (field, bad value, param it must name); shared by both endpoints
SHARED: list[tuple[str, object, str]] = [
    *[("model", v, "model") for v in (123, [], {}, True)],
    *[("temperature", v, "temperature") for v in (-0.1, -1e9, True, "1", [], {}, None)],
    *[("top_p", v, "top_p") for v in (0, -1, 1.5, True, "x", None)],
    *[("n", v, "n") for v in (0, -1, 129, 10**9, True, 1.5, "2", None)],
    *[("stop", v, "stop") for v in ("", [""], ["a"] * 17, 5, [5], True, {"a": 1})],
    *[("seed", v, "seed") for v in (True, 1.5, "1", 2**64, -(2**63) - 1, [])],
    *[("stream", v, "stream") for v in ("yes", 1, None, [])],
    *[("stream_options", v, "stream_options") for v in ("x", 5, [])],
    ("stream_options", {"continuous_usage_stats": 1}, "stream_options.continuous_usage_stats"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    *[("user", v, "user") for v in (5, ["a"], True, {})],
    *[("presence_penalty", v, "presence_penalty") for v in (2.5, -3, True, "x", None)],
    *[("frequency_penalty", v, "frequency_penalty") for v in (2.01, -3, True, "x", None)],
    *[("repetition_penalty", v, "repetition_penalty") for v in (0, -1, 11, True, "x", None)],
    *[
        ("logit_bias", v, "logit_bias")
        for v in ("x", {"5": "a"}, [1], 5, {"x": 1}, {"-1": 1}, {"101": 1}, {"5": 101})
    ],
    *[("min_tokens", v, "min_tokens") for v in (-1, True, "1", 1.5, 10**6)],
    *[("stop_token_ids", v, "stop_token_ids") for v in (5, [-1], [101], ["a"], [1] * 17)],
    *[("include_stop_str_in_output", v, "include_stop_str_in_output") for v in (1, "x")],
    *[("prompt_logprobs", v, "prompt_logprobs") for v in (-1, 21, True, "1")],
    *[("top_k", v, "top_k") for v in (-2, True, 1.5, "3", None)],
    *[("min_p", v, "min_p") for v in (-0.1, 1.1, True, "x", None)],
    *[("ignore_eos", v, "ignore_eos") for v in ("yes", 1, None, [])],
    *[("exit_threshold", v, "exit_threshold") for v in (-1, True, "x", [])],
    *[("min_loops", v, "min_loops") for v in (0, -1, True, 1.5, "2")],
    # JSON's non-standard NaN / Infinity tokens, which Python's json accepts
    *[(f, (RAW, v), f) for f in ("temperature", "top_p", "min_p") for v in ("NaN", "-Infinity")],
    # vLLM extensions away from their neutral value
    *[(f, v, f) for f, v in (("use_beam_search", True), ("guided_json", {}), ("functions", 1))],
    *[(f, v, f) for f, v in (("skip_special_tokens", False), ("chat_template", "{{ x }}"))],
]

COMPLETION_ONLY: list[tuple[str, object, str]] = [
    *[
        ("prompt", v, "prompt")
        for v in ("", [], [""], [[]], [-1], [10**6], [1.5], [True], {"a": 1}, None, 5)
    ],
    *[("prompt", v, "prompt") for v in ([["a"]], [[1, -2]], [1, "a"], "the " * 70, [3] * 70)],
    ("prompt", (RAW, '"\\ud800"'), "prompt"),
    ("prompt", (RAW, '["ok", "\\udfff"]'), "prompt"),
    *[("max_tokens", v, "max_tokens") for v in (0, -1, True, "5", 1.5, 10**6, [], 64)],
    *[("logprobs", v, "logprobs") for v in (-1, 21, True, 1.5, "2")],
    *[("echo", v, "echo") for v in ("x", 1, [])],
    *[("best_of", v, "best_of") for v in (0, 2, True, "1")],
    *[("suffix", v, "suffix") for v in ("x", 5, [])],
    ("messages", HI, "messages"),
]

CHAT_ONLY: list[tuple[str, object, str]] = [
    *[("messages", v, "messages") for v in ([], "x", None, 5, {}, [[]], ["hi"])],
    ("messages", [{}], "messages.0"),
    ("messages", [{"role": "x", "content": "a"}], "messages.0.role"),
    ("messages", [{"role": "tool", "content": "a", "tool_call_id": 5}], "messages.0.tool_call_id"),
    ("messages", [{"role": "assistant", "content": "a", "tool_calls": [{}]}], "messages.0"),
    ("messages", [{"role": 5, "content": "a"}], "messages.0.role"),
    ("messages", [{"role": "user"}], "messages.0.content"),
    ("messages", [{"role": "user", "content": 5}], "messages.0.content"),
    ("messages", [{"role": "user", "content": [{"type": "image", "text": "a"}]}], "messages.0"),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}], "messages.0"),
    ("messages", [{"role": "user", "content": "a", "name": 5}], "messages.0.name"),
    ("messages", [{"role": "user", "content": "the " * 70}], "messages"),
    ("messages", (RAW, '[{"role": "user", "content": "\\ud800"}]'), "messages.0.content"),
    ("messages", (RAW, '[{"role": "user", "content": "a", "name": "\\udc00"}]'), "messages.0"),
    *[("max_tokens", v, "max_tokens") for v in (0, -1, True, "5", 1.5, 10**6)],
    *[("max_completion_tokens", v, "max_completion_tokens") for v in (0, True, "5", 10**6)],
    *[("logprobs", v, "logprobs") for v in ("x", 1, None, [])],
    ("top_logprobs", 2, "top_logprobs"),
    *[("top_logprobs", v, "top_logprobs") for v in (-1, 21, True, "2")],
    *[("tools", v, "tools") for v in ("x", 5, [])],
    ("tools", [{"type": "function"}], "tools.0.function"),
    ("tools", [{"type": "function", "function": {"name": "a b"}}], "tools.0.function.name"),
    *[("tool_choice", v, "tool_choice") for v in ("auto", "required", "any", 5)],
    ("tool_choice", {"type": "function"}, "tool_choice"),
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("response_format", {"type": "json_schema"}, "response_format.json_schema"),
    ("structured_outputs", {"regex": "("}, "structured_outputs"),
    ("response_format", "json", "response_format"),
    ("prompt", "hi", "prompt"),
]

CONFLICTS: list[tuple[str, dict, str]] = [
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    (CHAT, {"messages": HI, "prompt_logprobs": 1}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 64}, "max_tokens"),
    (CHAT, {"messages": HI, "max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens"),
    (CHAT, {"messages": HI, "top_logprobs": 1, "logprobs": False}, "top_logprobs"),
    *[
        (path, {**base, "stream_options": {"include_usage": True}}, "stream_options")
        for path, base in ((COMPLETIONS, {"prompt": "hi"}), (CHAT, {"messages": HI}))
    ],
]


def _base(path: str) -> dict[str, object]:
    return (
        {"model": "tiny", "prompt": "hi"}
        if path == COMPLETIONS
        else {"model": "tiny", "messages": HI}
    )


def _field_cases() -> Iterator[object]:
    for path, fields in ((COMPLETIONS, SHARED + COMPLETION_ONLY), (CHAT, SHARED + CHAT_ONLY)):
        for field, value, param in fields:
            for stream in (False, True):
                if field == "stream" and stream:
                    continue  # the bad value is the stream flag itself
                yield pytest.param(
                    path, field, value, stream, param, id=f"{path}-{field}-{value!r:.40}-{stream}"
                )


def _encode(body: dict[str, object], raw: dict[str, str]) -> bytes:
    """JSON for ``body``, with ``raw`` fields spliced in as literal JSON text."""
    text = json.dumps(body)
    for name, literal in raw.items():
        text = text[:-1] + f', "{name}": {literal}}}'
    return text.encode()


def assert_openai_error(resp: httpx.Response, param: str | None) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is None:
        assert error["param"] is None, error
    else:
        assert error["param"] == param or str(error["param"]).startswith(param + "."), error


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = ServeSettings(
        model=str(write_tiny_rrt(tmp_path_factory.mktemp("battery"))),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=64,
        max_body_bytes="64KiB",
        threads=1,
    )
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        server.client = c  # type: ignore[attr-defined]
        yield server


def post(live: LiveServer, path: str, content: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return live.client.post(path, content=content, headers=headers)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("path", "field", "value", "stream", "param"), list(_field_cases()))
def test_bad_field(
    live: LiveServer, path: str, field: str, value: object, stream: bool, param: str
) -> None:
    body = {**_base(path), "stream": stream}
    raw: dict[str, str] = {}
    if isinstance(value, tuple) and value and value[0] is RAW:
        body.pop(field, None)
        raw[field] = value[1]
    else:
        body[field] = value
    resp = post(live, path, _encode(body, raw))
    if field == "model" and isinstance(value, str):
        assert resp.status_code == 404
    assert_openai_error(resp, param)


@pytest.mark.parametrize(("path", "body", "param"), CONFLICTS)
@pytest.mark.parametrize("stream", [False, True])
def test_conflicting_fields(
    live: LiveServer, path: str, body: dict, param: str, stream: bool
) -> None:
    if "stream_options" in body and stream:
        pytest.skip("stream_options is valid with stream=true")
    if "prompt_logprobs" in body and not stream:
        pytest.skip("chat answers prompt_logprobs when not streamed")
    resp = post(live, path, json.dumps({"model": "tiny", **body, "stream": stream}).encode())
    assert_openai_error(resp, param)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b"null", b"123", b'"text"', b"\xff\xfe{}", b'{"model": "tiny",,}', b"{}"],
)
def test_malformed_bodies(live: LiveServer, path: str, content: bytes) -> None:
    resp = post(live, path, content)
    param = None if content != b"{}" else ("prompt" if path == COMPLETIONS else "messages")
    assert_openai_error(resp, param)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("model", ["nope", "", "TINY", "tiny "])
def test_unknown_models_are_404(live: LiveServer, path: str, model: str) -> None:
    body = {**_base(path), "model": model}
    resp = post(live, path, json.dumps(body).encode())
    assert resp.status_code == 404
    assert_openai_error(resp, "model")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", COMPLETIONS, 405),
        ("GET", CHAT, 405),
        ("PUT", COMPLETIONS, 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/embeddings", 404),
        ("POST", "/v1/completions/x", 404),
        ("GET", "/v1/models/nope", 404),
        ("POST", "/health", 405),
    ],
)
def test_wrong_routes_and_methods(live: LiveServer, method: str, path: str, status: int) -> None:
    resp = live.client.request(method, path)  # type: ignore[attr-defined]
    assert resp.status_code == status
    assert_openai_error(resp, "model" if path == "/v1/models/nope" else None)


def test_oversized_body_is_413(live: LiveServer) -> None:
    body = {**_base(COMPLETIONS), "prompt": "a " * 40_000}
    resp = post(live, COMPLETIONS, json.dumps(body).encode())
    assert resp.status_code == 413
    assert_openai_error(resp, None)


# -- valid requests honour their parameters -----------------------------------------------


def _stream_choices(resp: httpx.Response, chat: bool) -> tuple[dict[int, dict], dict | None]:
    """Per choice index: text, finish_reason, logprob tokens; and the usage chunk."""
    lines = [ln.removeprefix("data: ") for ln in resp.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    choices: dict[int, dict] = {}
    usage = None
    for line in lines[:-1]:
        chunk = json.loads(line)
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            got = choices.setdefault(c["index"], {"text": "", "finish_reason": None, "tokens": 0})
            got["text"] += (c["delta"].get("content") or "") if chat else c["text"]
            got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
            if c.get("logprobs"):
                lp = c["logprobs"]
                got["tokens"] += len(lp["content"] if chat else lp["tokens"])
    return choices, usage


def _valid_cases(count: int) -> Iterator[object]:
    rng = random.Random(16)
    words = ["the", "cat", "dog", "sun", "moon", "red", "blue", "hello", "world"]
    for i in range(count):
        chat = i % 2 == 1
        n, max_tokens, stream = rng.randint(1, 3), rng.randint(1, 6), rng.random() < 0.5
        text = " ".join(rng.choices(words, k=rng.randint(1, 6)))
        body: dict[str, object] = {"model": "tiny", "n": n, "stream": stream, "ignore_eos": True}
        body["temperature"] = rng.choice([0, 0.7, 1.0, 2.0])
        body["seed"] = rng.randint(0, 1000)
        body["top_k"] = rng.choice([0, -1, 1, 5])
        body["top_p"] = rng.choice([1.0, 0.9, 0.5])
        if stream and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
            body[rng.choice(["max_tokens", "max_completion_tokens"])] = max_tokens
            if rng.random() < 0.5:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
        else:
            body["prompt"] = [text, "the cat"] if rng.random() < 0.3 else text
            body["max_tokens"] = max_tokens
            if rng.random() < 0.4:
                body["logprobs"] = rng.randint(0, 3)
            elif rng.random() < 0.3:
                body["echo"] = True
        yield pytest.param(CHAT if chat else COMPLETIONS, body, id=f"valid-{i}")


@pytest.mark.parametrize(("path", "body"), list(_valid_cases(60)))
def test_valid_requests_honour_their_parameters(live: LiveServer, path: str, body: dict) -> None:
    chat = path == CHAT
    resp = post(live, path, json.dumps(body).encode())
    assert resp.status_code == 200, resp.text
    prompts = body["prompt"] if isinstance(body.get("prompt"), list) else [body.get("prompt")]
    expected = len(prompts) * body["n"]
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    want_logprobs = body.get("logprobs") not in (None, False)
    if body["stream"]:
        choices, usage = _stream_choices(resp, chat)
        include_usage = body.get("stream_options", {}).get("include_usage", False)
        assert (usage is not None) == include_usage
        tokens_each = [c["tokens"] for c in choices.values()] if want_logprobs else None
        texts = [choices[i]["text"] for i in sorted(choices)]
        reasons = [choices[i]["finish_reason"] for i in sorted(choices)]
    else:
        out = resp.json()
        usage = out["usage"]
        objs = out["choices"]
        assert [c["index"] for c in objs] == list(range(len(objs)))
        texts = [c["message"]["content"] if chat else c["text"] for c in objs]
        reasons = [c["finish_reason"] for c in objs]
        tokens_each = None
        if want_logprobs:
            tokens_each = [
                len(c["logprobs"]["content"] if chat else c["logprobs"]["tokens"]) for c in objs
            ]
            top = body.get("top_logprobs") if chat else body["logprobs"]
            for c in objs:
                tops = (
                    [t["top_logprobs"] for t in c["logprobs"]["content"]]
                    if chat
                    else c["logprobs"]["top_logprobs"]
                )
                assert all(len(t) >= top for t in tops)
    assert len(texts) == expected
    assert reasons == ["length"] * expected  # ignore_eos, no stop: every choice runs out
    if tokens_each is not None:
        assert tokens_each == [max_tokens] * expected
    if usage is not None:
        assert usage["completion_tokens"] == expected * max_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if body.get("echo"):
        for i, t in enumerate(texts):
            assert t.startswith(prompts[i // body["n"]])
