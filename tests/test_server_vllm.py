"""What a vLLM client sends, on a live server with the tiny model: lenient requests, vLLM's
sampling controls, prompt scoring, the token endpoints and a replaced chat template."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_support import LiveServer, write_tiny_rrt

from model.checkpoint import load_model
from server.params import IGNORED_HEADER
from server.settings import ServeSettings

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m.get('name', 'nobody') }} {{ m['content'] }} "
    "{% endfor %}{% if greeting %}hello {% endif %}{% if add_generation_prompt %}assistant "
    "{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_rrt(tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def live(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    settings = ServeSettings(
        model=str(tiny_dir),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=128,
        threads=1,
        chat_template=str(template),
    )
    with LiveServer(settings) as server:
        yield server


def post(live: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body, timeout=60)


def complete(live: LiveServer, **body: object) -> dict:
    resp = post(live, "/v1/completions", {"temperature": 0, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def token_ids(live: LiveServer, text: str) -> list[int]:
    return post(live, "/tokenize", {"prompt": text}).json()["tokens"]


def generated_ids(live: LiveServer, choice: dict) -> list[int]:
    return [token_ids(live, t)[0] for t in choice["logprobs"]["tokens"]]


# -- lenient requests --------------------------------------------------------------------


def test_vllm_bench_serve_default_request_is_served(live: LiveServer) -> None:
    """The body ``vllm bench serve`` sends with its default backend, extensions and all."""
    body = {
        "model": "tiny",
        "prompt": "the cat",
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 4,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(c["usage"] is not None for c in chunks)  # continuous usage: in every chunk
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_unknown_fields_are_ignored_and_named_in_a_header(live: LiveServer) -> None:
    plain = complete(live, prompt="the dog", max_tokens=5, ignore_eos=True)
    resp = post(
        live,
        "/v1/completions",
        {
            "prompt": "the dog",
            "max_tokens": 5,
            "ignore_eos": True,
            "temperature": 0,
            "bogus": {"deep": 1},
            "priority": 0,
            "use_beam_search": False,
            "\u00e9\n": 1,
            " ": 2,  # defect: a header value ending in a space made the response fail
            "a, b ": 3,
        },
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers[IGNORED_HEADER] == (
        "bogus,priority,use_beam_search,\\xe9\\n,\\x20,a\\x2c\\x20b\\x20"
    )
    assert resp.json()["choices"][0]["text"] == plain["choices"][0]["text"]
    assert resp.json()["model"] == "tiny"  # model left out: the served one
    chat = post(
        live,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi", "cache_control": "x"}], "max_tokens": 1},
    )
    assert chat.status_code == 200, chat.text
    assert chat.headers[IGNORED_HEADER] == "messages.0.cache_control"


# -- sampling controls -------------------------------------------------------------------


def test_logit_bias_forces_a_token(live: LiveServer) -> None:
    word = token_ids(live, "moon")[0]
    out = complete(
        live, prompt="the", max_tokens=4, ignore_eos=True, logit_bias={str(word): 100}, logprobs=0
    )
    assert generated_ids(live, out["choices"][0]) == [word] * 4


def test_min_tokens_holds_off_eos_and_stop_token_ids_stop(live: LiveServer) -> None:
    eos = 2  # the tiny tokenizer's <|im_end|>
    eager = {"prompt": "the", "max_tokens": 6, "logit_bias": {str(eos): 100}, "logprobs": 0}
    assert complete(live, **eager)["usage"]["completion_tokens"] == 1
    held = complete(live, **eager, min_tokens=3)
    assert held["usage"]["completion_tokens"] == 4  # 3 non-EOS tokens, then EOS
    assert held["choices"][0]["finish_reason"] == "stop"
    base = complete(live, prompt="the sun", max_tokens=6, ignore_eos=True, logprobs=0)
    ids = generated_ids(live, base["choices"][0])
    stop_id = ids[2]
    cut = complete(
        live, prompt="the sun", max_tokens=6, ignore_eos=True, stop_token_ids=[stop_id], logprobs=0
    )
    assert generated_ids(live, cut["choices"][0]) == ids[: ids.index(stop_id) + 1]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_include_stop_str_in_output(live: LiveServer) -> None:
    base = complete(live, prompt="the sun", max_tokens=8, ignore_eos=True)["choices"][0]["text"]
    stop = base.split()[2]
    without = complete(live, prompt="the sun", max_tokens=8, ignore_eos=True, stop=[stop])
    kept = complete(
        live,
        prompt="the sun",
        max_tokens=8,
        ignore_eos=True,
        stop=[stop],
        include_stop_str_in_output=True,
    )
    assert kept["choices"][0]["text"] == without["choices"][0]["text"] + stop


def test_chat_template_gets_names_and_kwargs(live: LiveServer) -> None:
    """The --chat-template file renders, with a message's name and chat_template_kwargs."""
    messages = [
        {"role": "user", "content": "a cat", "name": "dog"},
        {"role": "user", "content": "hi"},
    ]
    rendered = post(
        live, "/tokenize", {"messages": messages, "chat_template_kwargs": {"greeting": True}}
    ).json()
    want = token_ids(live, "user dog a cat user nobody hi hello assistant")
    assert rendered["tokens"] == want
    chat = post(
        live,
        "/v1/chat/completions",
        {"messages": messages, "chat_template_kwargs": {"greeting": True}, "max_tokens": 1},
    )
    assert chat.json()["usage"]["prompt_tokens"] == len(want)
    bad = post(
        live,
        "/v1/chat/completions",
        {"messages": messages, "chat_template_kwargs": {"tokenize": True}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


# -- prompt logprobs ---------------------------------------------------------------------


def test_echo_scores_match_generation_and_a_float64_forward(
    live: LiveServer, tiny_dir: Path
) -> None:
    """Scoring prompt + continuation (echo, max_tokens 0) gives the continuation's tokens the
    logprobs the paged engine sampled them with, and a float64 cache-free forward agrees."""
    gen = complete(live, prompt="the red dog", max_tokens=5, ignore_eos=True, logprobs=2)
    choice = gen["choices"][0]
    prompt_ids = token_ids(live, "the red dog")
    full = prompt_ids + generated_ids(live, choice)
    scored = complete(live, prompt=full, max_tokens=0, echo=True, logprobs=2)
    lp = scored["choices"][0]["logprobs"]
    assert scored["usage"] == {
        "prompt_tokens": len(full),
        "completion_tokens": 0,
        "total_tokens": len(full),
        "mean_loops_per_token": None,
        "prompt_tokens_details": None,  # prefix caching is off
    }
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(full)
    tail = lp["token_logprobs"][len(prompt_ids) :]
    assert tail == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-4)
    model = load_model(tiny_dir, dtype=torch.float64)
    with torch.no_grad():
        ref = model(torch.tensor([full]))[0].log_softmax(-1)
    want = [ref[i - 1, t].item() for i, t in enumerate(full) if i]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        assert len(top) in (2, 3) and max(top.values()) == pytest.approx(
            ref[i - 1].max().item(), abs=1e-4
        )


def test_echo_with_generation_and_vllm_prompt_logprobs(live: LiveServer) -> None:
    ids = token_ids(live, "the cat")
    out = complete(
        live,
        prompt="the cat",
        max_tokens=3,
        ignore_eos=True,
        echo=True,
        logprobs=1,
        prompt_logprobs=2,
    )
    choice = out["choices"][0]
    assert choice["text"].startswith("the cat")
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 3
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    entry = plp[1][str(ids[1])]
    assert entry["logprob"] == pytest.approx(choice["logprobs"]["token_logprobs"][1], abs=1e-5)
    assert entry["rank"] >= 1 and entry["decoded_token"] == "cat"
    ranked = sorted(plp[1].values(), key=lambda e: e["rank"])
    assert [e["rank"] for e in ranked[:2]] == [1, 2]  # the top 2, then the prompt's own token
    assert ranked[0]["logprob"] >= ranked[1]["logprob"] >= ranked[-1]["logprob"] - 1e-6
    assert sum(math.exp(e["logprob"]) for e in plp[1].values()) <= 1 + 1e-5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0, "echo": True, "stream": True}, "stream"),
        ({"prompt": "the " * 129, "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt"),
        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_bad_scoring_requests_are_400(live: LiveServer, body: dict, param: str) -> None:
    resp = post(live, "/v1/completions", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


# -- endpoints ---------------------------------------------------------------------------


def test_token_endpoints_ping_and_model(live: LiveServer) -> None:
    tok = post(live, "/tokenize", {"prompt": "the cat", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == 2 and tok["token_strs"] == ["the", "cat"]
    assert tok["max_model_len"] == 128
    assert post(live, "/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": "the cat"}
    assert post(live, "/detokenize", {"tokens": [101]}).status_code == 400
    assert post(live, "/tokenize", {}).status_code == 400
    assert httpx.get(f"{live.url}/ping").status_code == 200
    assert httpx.post(f"{live.url}/ping").status_code == 200
    assert httpx.get(f"{live.url}/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(f"{live.url}/v1/models/other").status_code == 404


# -- metrics -----------------------------------------------------------------------------


def _samples(live: LiveServer) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{live.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _http(samples: dict, route: str, method: str, status: str) -> float:
    labels = {"model_name": "tiny", "route": route, "method": method, "status": status}
    return samples.get(("loopserve:http_responses_total", tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_responses_and_vllm_series(live: LiveServer) -> None:
    before = _samples(live)
    complete(live, prompt="the cat", max_tokens=3, ignore_eos=True)
    post(live, "/v1/completions", {"prompt": "hi", "temperature": -1})
    httpx.get(f"{live.url}/no/such/path")
    httpx.get(f"{live.url}/v1/models/other")
    after = _samples(live)
    for route, method, status in [
        ("/v1/completions", "POST", "200"),
        ("/v1/completions", "POST", "400"),
        ("other", "GET", "404"),
        ("/v1/models/{model}", "GET", "404"),
    ]:
        assert _http(after, route, method, status) == _http(before, route, method, status) + 1

    def count(name: str) -> float:
        key = (f"loopserve:{name}_count", (("model_name", "tiny"),))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for name in (
        "request_time_per_output_token_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_inference_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert count(name) == 1, name
    assert count("iteration_tokens_total") >= 3
    tokens = after[("loopserve:request_generation_tokens_sum", (("model_name", "tiny"),))]
    assert (
        tokens
        - before.get(("loopserve:request_generation_tokens_sum", (("model_name", "tiny"),)), 0)
        == 3
    )
    ttft_edges = {
        float(dict(k[1])["le"])
        for k in after
        if k[0] == "loopserve:time_to_first_token_seconds_bucket"
    }
    assert max(e for e in ttft_edges if e != float("inf")) >= 60


def test_streamed_echo_carries_the_prompt_scores_first(live: LiveServer) -> None:
    body = {"prompt": "the cat", "max_tokens": 3, "ignore_eos": True, "echo": True}
    body |= {"logprobs": 1, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as resp:
        chunks = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == "the cat" and first["logprobs"]["tokens"] == ["the", "cat"]
    assert first["logprobs"]["token_logprobs"][0] is None
    whole = complete(live, **{k: v for k, v in body.items() if k != "stream"})
    streamed = [
        lp
        for c in chunks
        for ch in c["choices"]
        if ch["logprobs"]
        for lp in ch["logprobs"]["token_logprobs"]
    ]
    assert streamed == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
