"""Tool calls over HTTP: a forced tool choice (``required`` or a named function) constrains the
reply to the functions' schemas and comes back as ``tool_calls``, whole and streamed; tool
turns are accepted. The model's tokenizer here spells characters, so JSON is spellable."""

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

CHARS = list('{}[]":,_ abcdefghijklmnopqrstuvwxyz0123456789')
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
