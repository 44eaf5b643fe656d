"""Structured outputs through the engine and the API: the grammar mask applies before the exit
rule, so a constrained request with early exit on returns the full-depth constrained tokens,
and forced tokens leave the loop early."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from server_support import LiveServer, write_tiny_rrt, write_tiny_tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.recursive import RecursiveLM
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from scheduler.structured import GrammarSpec
from server.settings import ServeSettings

CHOICES = ["catbigred", "moonfast", "sunbluegreen", "sunblue"]  # no word is a dead-end prefix
EOS = 2


@pytest.fixture(scope="module")
def rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False
    )
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def _reference(
    model: RecursiveLM, tok: PreTrainedTokenizerBase, prompt: list[int], n: int
) -> list[int]:
    """Full-depth greedy under the choice constraint, by brute force over the vocabulary: a
    token is allowed if the text so far plus its string is a prefix of some choice (the tiny
    tokenizer's strings are its words), EOS once the text is a whole choice."""
    words = {t: tok.convert_ids_to_tokens(t) for t in range(3, len(tok))}  # ids past it: none
    out: list[int] = []
    text = ""
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out]))[0, -1]
        allowed = [
            t
            for t in range(logits.numel())
            if (t == EOS and text in CHOICES)
            or (t in words and any(c.startswith(text + words[t]) for c in CHOICES))
        ]
        best = max(allowed, key=lambda t: logits[t].item())
        out.append(best)
        if best == EOS:
            break
        text += words[best]
    return out


def _run(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    depths: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_work:
        for o in engine.step()[0]:
            tokens[o.request_id] += o.token_ids
            depths[o.request_id] += o.exit_depths
    return {"tokens": tokens, "depths": depths}


def test_constrained_output_with_early_exit_equals_full_depth(
    rrt: RecursiveLM, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = {
        f"r{i}": tokenizer(p)["input_ids"] for i, p in enumerate(["the cat", "a dog is", "hello"])
    }
    config = EngineConfig(
        block_size=4, num_blocks=512, max_model_len=128, exit_threshold=0.999, min_loops=1
    )
    spec = GrammarSpec("choice", json.dumps(CHOICES))
    params = SamplingParams(max_tokens=8, temperature=0.0, grammar=spec)
    got = _run(Engine(rrt, config, tokenizer), prompts, params)
    for rid, ids in prompts.items():
        assert got["tokens"][rid] == _reference(rrt, tokenizer, ids, 8), rid
        text = "".join(tokenizer.convert_ids_to_tokens(got["tokens"][rid][:-1]))
        assert text in CHOICES and got["tokens"][rid][-1] == EOS
    # a forced token (one allowed id: confidence 1) leaves at the first depth
    assert min(d for ds in got["depths"].values() for d in ds) == 0
    unconstrained = _run(
        Engine(rrt, config, tokenizer), prompts, SamplingParams(max_tokens=8, temperature=0.0)
    )
    assert unconstrained["tokens"] != got["tokens"]


def test_each_sample_of_n_has_its_own_matcher(
    rrt: RecursiveLM, tokenizer: PreTrainedTokenizerBase
) -> None:
    config = EngineConfig(block_size=4, num_blocks=512, max_model_len=128)
    spec = GrammarSpec("regex", "(cat|moon)(big|small)(red|blue)")
    params = SamplingParams(max_tokens=6, temperature=1.5, n=4, seed=3, grammar=spec)
    outs = Engine(rrt, config, tokenizer).generate({"r": tokenizer("the")["input_ids"]}, params)
    for out in outs["r"]:
        words = tokenizer.convert_ids_to_tokens([t for t in out if t != EOS])
        assert words[0] in ("cat", "moon") and words[1] in ("big", "small"), words
        assert words[2] in ("red", "blue") and len(words) == 3


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = ServeSettings(
        model=str(write_tiny_rrt(tmp_path_factory.mktemp("so"))),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=128,
        threads=1,
    )
    with LiveServer(settings) as server:
        yield server


def _post(live: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json={"temperature": 0, **body}, timeout=60)


def test_structured_outputs_over_http(live: LiveServer) -> None:
    chat = _post(
        live,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "structured_outputs": {"choice": ["moonblue", "catbigred"]},
        },
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] in ("moon blue", "cat big red")
    assert chat.json()["choices"][0]["finish_reason"] == "stop"
    regex = _post(
        live,
        "/v1/completions",
        {
            "prompt": "the",
            "max_tokens": 6,
            "structured_outputs": {"regex": "(big|small)(cat|moon)"},
        },
    )
    assert regex.status_code == 200, regex.text
    words = regex.json()["choices"][0]["text"].split()
    assert words[0] in ("big", "small") and words[1] in ("cat", "moon") and len(words) == 2
    # a schema this vocabulary cannot spell ('{' is no token): the sequence ends at once
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    dead = _post(
        live, "/v1/completions", {"prompt": "the", "max_tokens": 4, "response_format": schema}
    )
    assert dead.status_code == 200, dead.text
    assert dead.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "structured_outputs",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
        ),
    ],
)
def test_bad_constraints_are_400(live: LiveServer, body: dict, param: str) -> None:
    resp = _post(live, "/v1/completions", {"prompt": "the", "max_tokens": 2, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
