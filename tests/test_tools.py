"""Tool calls over HTTP: a forced tool choice (``required`` or a named function) constrains the
reply to the functions' schemas and comes back as ``tool_calls``, whole and streamed; tool
turns are accepted; ``auto`` reads the model's own hermes-format calls where the server was
started for it. The model's tokenizer here spells characters, so JSON is spellable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import tiny_llama_config, write_hf_model
from server_support import LiveServer
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import BPE

from model.build import convert_checkpoint
from model.config import LINEAR_MODULES
from server.settings import ServeSettings

CHARS = list('{}[]":,_ abcdefghijklmnopqrstuvwxyz0123456789<>/')
SPECIALS = ["<unk>", "<s>", "</s>"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] or '' }}{% endfor %}"
    "{% if tools %}tools:{% for t in tools %}{{ t['function']['name'] }},{% endfor %}{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["oslo", "rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "clock",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },
    },
}


def _char_model(root: Path) -> Path:
    src, out = root / "hf", root / "rrt"
    src.mkdir()
    write_hf_model(src, tiny_llama_config())
    vocab = {c: i for i, c in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(BPE(vocab, [], unk_token="<unk>"))  # no merges: one token per character
    tok.decoder = decoders.Fuse()  # decoding concatenates, as a byte-level BPE's does
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(src / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
    config |= {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    convert_checkpoint(
        src, out, loops=2, init="average", ranks=dict.fromkeys(LINEAR_MODULES, 4), evaluate=False
    )
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = ServeSettings(
        model=str(_char_model(tmp_path_factory.mktemp("tools"))),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=128,
        threads=1,
    )
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def auto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The same model behind ``--enable-auto-tool-choice --tool-call-parser hermes``."""
    settings = ServeSettings(
        model=str(_char_model(tmp_path_factory.mktemp("auto_tools"))),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=256,
        threads=1,
        enable_auto_tool_choice=True,
        tool_call_parser="hermes",
    )
    with LiveServer(settings) as server:
        yield server


def _chat(live: LiveServer, **body: object) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0}
    return httpx.post(f"{live.url}/v1/chat/completions", json=payload | body, timeout=60)


def test_named_function_is_called_with_schema_arguments(live: LiveServer) -> None:
    choice = {"type": "function", "function": {"name": "weather"}}
    resp = _chat(live, tools=[WEATHER, CLOCK], tool_choice=choice)
    assert resp.status_code == 200, resp.text
    out = resp.json()["choices"][0]
    assert out["message"]["content"] is None and out["finish_reason"] == "stop"
    (call,) = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("oslo", "rome")


def test_required_calls_stream_and_whole_agree(live: LiveServer) -> None:
    whole = _chat(live, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    assert whole.status_code == 200, whole.text
    out = whole.json()["choices"][0]
    assert out["finish_reason"] == "tool_calls"
    (call,) = out["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert (call["function"]["name"], set(args)) in (("weather", {"city"}), ("clock", {"utc"}))
    body = {"tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": False}
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0}
    with httpx.stream(
        "POST", f"{live.url}/v1/chat/completions", json=payload | body | {"stream": True}
    ) as resp:
        lines = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    chunks = [json.loads(ln) for ln in lines[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("content") for d in deltas)  # the JSON is not streamed as text
    (streamed,) = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert streamed["index"] == 0 and streamed["function"] == call["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_turns_are_accepted_and_auto_is_refused(live: LiveServer) -> None:
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
    ]
    resp = _chat(live, messages=history, tools=[CLOCK], tool_choice="none", max_tokens=3)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["tool_calls"] == []
    for choice in (None, "auto"):
        refused = _chat(live, tools=[CLOCK], **({} if choice is None else {"tool_choice": choice}))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
    unknown = _chat(
        live, tools=[CLOCK], tool_choice={"type": "function", "function": {"name": "x"}}
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"


# the random model is made to write a hermes call by a regex constraint on its reply
HERMES_REPLY = 'ok <tool_call>{"name": "weather", "arguments": {"city": "oslo"}}</tool_call>'


def _regex(text: str) -> dict[str, object]:
    escaped = "".join("\\" + c if c in "{}[]" else c for c in text)
    return {"structured_outputs": {"regex": escaped}, "max_tokens": len(text) + 4}


def _stream(live: LiveServer, **body: object) -> list[dict]:
    payload = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{live.url}/v1/chat/completions", json=payload | body, timeout=60
    ) as resp:
        assert resp.status_code == 200
        lines = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_auto_reads_the_models_own_calls(auto: LiveServer) -> None:
    resp = _chat(auto, tools=[WEATHER, CLOCK], **_regex(HERMES_REPLY))
    assert resp.status_code == 200, resp.text
    out = resp.json()["choices"][0]
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == "ok"
    (call,) = out["message"]["tool_calls"]
    assert call["function"]["name"] == "weather" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "oslo"}
    chunks = _stream(auto, tools=[WEATHER, CLOCK], tool_choice="auto", **_regex(HERMES_REPLY))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "ok " and "<" not in content  # the call's markup never goes out as text
    (streamed,) = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert streamed["function"]["name"] == "weather"
    assert json.loads(streamed["function"]["arguments"]) == {"city": "oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_without_a_call_is_text(auto: LiveServer) -> None:
    """A reply with no call, and one whose call is malformed, come back whole as content,
    streamed and not."""
    for text in ("plain answer", "a <tool_call>{bad}</tool_call>"):
        out = _chat(auto, tools=[CLOCK], **_regex(text)).json()["choices"][0]
        assert out["message"]["content"] == text and out["message"]["tool_calls"] == []
        assert out["finish_reason"] == "stop"
        chunks = _stream(auto, tools=[CLOCK], **_regex(text))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == text
        assert not any(d.get("tool_calls") for d in deltas)


def test_auto_tool_choice_needs_a_parser() -> None:
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServeSettings(enable_auto_tool_choice=True)
    assert ServeSettings(tool_call_parser="hermes").auto_tool_parser is None
