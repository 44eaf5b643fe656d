"""End to end on Gemma 3 270M's real weights (``loopserve pull gemma3-270m``; skipped if it is
not pulled): transformers parity, exact full-rank conversions, greedy text through the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM

from model.build import convert_checkpoint
from model.checkpoint import load_model
from model.config import FULL_RANK, LINEAR_MODULES
from model.pull import GEMMA3_270M, is_complete, source_model_dir
from server.settings import ServeSettings
from tests.server_support import LiveServer

SOURCE = source_model_dir(source=GEMMA3_270M)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not is_complete(SOURCE), reason="Gemma 3 270M is not pulled (loopserve pull gemma3-270m)"
    ),
]
NEW_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village,",
]
ATOL = 1e-4  # the Llama parity tests' tolerance, on logits of magnitude ~30


@pytest.fixture(scope="module")
def hf() -> Gemma3ForCausalLM:
    return Gemma3ForCausalLM.from_pretrained(str(SOURCE), local_files_only=True).eval()


@pytest.fixture(scope="module")
def prompt_ids() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(SOURCE), local_files_only=True)
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(hf: Gemma3ForCausalLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' own generate, greedy, on the same weights."""
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            gen = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exact B = 2 conversion: Gemma's windows and RoPE bases differ by depth at B = 2."""
    out = tmp_path_factory.mktemp("gemma3") / "rrt2"
    full = dict.fromkeys(LINEAR_MODULES, FULL_RANK)
    convert_checkpoint(SOURCE, out, loops=2, init="average", ranks=full, evaluate=False)
    return out


def test_logits_equal_transformers(hf: Gemma3ForCausalLM, prompt_ids: list[list[int]]) -> None:
    ours = load_model(SOURCE)
    a = ours.config.arch
    assert (a.num_layers, a.vocab_size, a.layer_windows[5], a.layer_windows[0]) == (
        18,
        262144,
        0,
        512,
    )
    with torch.no_grad():
        for ids in prompt_ids[:2]:
            x = torch.tensor([ids])
            diff = float((ours(x) - hf(x).logits).abs().max())
            assert diff <= ATOL, f"max abs logit diff {diff}"


@pytest.mark.parametrize("loops", [2, 3])
def test_full_rank_conversion_is_exact(
    loops: int, converted: Path, tmp_path: Path, hf: Gemma3ForCausalLM, prompt_ids: list[list[int]]
) -> None:
    if loops == 2:
        model = load_model(converted)
    else:
        full = dict.fromkeys(LINEAR_MODULES, FULL_RANK)
        out = tmp_path / "rrt3"
        convert_checkpoint(SOURCE, out, loops=3, init="average", ranks=full, evaluate=False)
        model = load_model(out)
    assert model.config.loops == loops
    x = torch.tensor([prompt_ids[0]])
    with torch.no_grad():
        diff = float((model(x) - hf(x).logits).abs().max())
    assert diff <= ATOL, f"B={loops}: max abs logit diff {diff}"


def _complete(server: LiveServer, ids: list[int]) -> str:
    body = {
        "model": server.info.name,
        "prompt": ids,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


@pytest.fixture(params=["vanilla", "rrt2"])
def server(request: pytest.FixtureRequest, converted: Path) -> Iterator[LiveServer]:
    model = SOURCE if request.param == "vanilla" else converted
    settings = ServeSettings(
        model=str(model), kv_cache_memory="64MiB", max_model_len=256, threads=2
    )
    with LiveServer(settings) as live:
        yield live


def test_greedy_through_the_server_equals_transformers(
    server: LiveServer, prompt_ids: list[list[int]], hf_greedy: list[list[int]]
) -> None:
    tok = AutoTokenizer.from_pretrained(str(SOURCE), local_files_only=True)
    for ids, want in zip(prompt_ids, hf_greedy, strict=True):
        assert _complete(server, ids) == tok.decode(want)
