"""vLLM's sampling controls through the engine: penalties see the right history, EOS ids from
generation_config.json stop, and its sampling defaults fill only fields a request left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.recursive import RecursiveLM
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from server.loader import read_generation_config
from server.params import sampling_params
from server.protocol import CompletionRequest


@pytest.fixture(scope="module")
def rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False
    )
    return model.eval()


def _engine(model: RecursiveLM, **kw: object) -> Engine:
    cfg = {"block_size": 4, "num_blocks": 512, "max_num_batched_tokens": 64, "max_model_len": 128}
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def _penalised_greedy(model: RecursiveLM, prompt: list[int], p: SamplingParams) -> list[int]:
    """Cache-free full forward per token, penalties applied token by token in float64."""
    out: list[int] = []
    for _ in range(p.max_tokens):
        with torch.no_grad():
            x = model(torch.tensor([prompt + out]))[0, -1].double()
        for t in range(x.numel()):
            if t in prompt or t in out:
                x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
            n = out.count(t)
            x[t] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
        out.append(int(x.argmax()))
    return out


@pytest.mark.parametrize("batching", ["depth", "sequence"])
def test_penalised_greedy_matches_the_reference_in_a_batch(rrt: RecursiveLM, batching: str) -> None:
    """Prompts that repeat tokens, decoded together: each request's penalties count its own
    prompt and output only."""
    prompts = {"a": [5, 5, 9, 12, 5], "b": [40, 41], "c": [7] * 9 + [60, 61, 62]}
    params = SamplingParams(
        max_tokens=10,
        temperature=0.0,
        ignore_eos=True,
        repetition_penalty=1.6,
        frequency_penalty=0.4,
        presence_penalty=0.3,
    )
    got = _engine(rrt, batching=batching).generate(prompts, params)
    want = {rid: _penalised_greedy(rrt, ids, params) for rid, ids in prompts.items()}
    assert {rid: outs[0] for rid, outs in got.items()} == want
    plain = _engine(rrt).generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
    assert plain != got  # the penalties changed the output


def test_extra_eos_ids_stop_and_min_tokens_holds_them_off(rrt: RecursiveLM) -> None:
    prompt = {"r": [3, 14, 15, 92]}
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = _engine(rrt).generate(prompt, free)["r"][0]
    stop = tokens[2]
    first = tokens.index(stop)
    stopping = SamplingParams(max_tokens=8, temperature=0.0)
    got = _engine(rrt, eos_token_ids=(stop,)).generate(prompt, stopping)["r"][0]
    assert got == tokens[: first + 1]
    held = SamplingParams(max_tokens=8, temperature=0.0, min_tokens=first + 2)
    later = _engine(rrt, eos_token_ids=(stop,)).generate(prompt, held)["r"][0]
    assert stop not in later[: first + 2] and len(later) >= first + 2


def test_generation_config_gives_eos_ids_and_defaults(tmp_path: Path) -> None:
    cfg = {"eos_token_id": [2, 7], "temperature": 0.6, "top_k": 20, "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    gen = read_generation_config(tmp_path)
    assert gen.eos_token_ids == (2, 7)
    assert gen.defaults == {"temperature": 0.6, "top_k": 20.0}
    assert read_generation_config(tmp_path, use=False).defaults == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({**cfg, "do_sample": False}))
    assert read_generation_config(tmp_path).defaults == {}
    left_out = CompletionRequest(prompt="x")
    p = sampling_params(left_out, 4, None, 101, gen.defaults)
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 20, 1.0)
    sent = CompletionRequest(prompt="x", temperature=1.0, top_k=-1)
    p = sampling_params(sent, 4, None, 101, gen.defaults)
    assert (p.temperature, p.top_k) == (1.0, 0)
