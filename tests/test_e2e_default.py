"""End to end on the real default model: SmolLM2-135M-Instruct, vanilla and exact 3-loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from loopserve.cli import main
from model.checkpoint import load_model
from model.default import ensure_default_model
from model.generate import greedy_generate
from model.pull import pull_default
from model.recursive import RecursiveLM
from model.serving import materialise_high_rank
from scheduler.async_engine import AsyncEngine
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams

pytestmark = pytest.mark.e2e
NEW_TOKENS = 20
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Name a famous physicist.",
    "How do bees make honey?",
    "Give me a synonym for happy.",
]


@pytest.fixture(scope="module")
def source_dir() -> Path:
    return pull_default()


@pytest.fixture(scope="module")
def default_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="module")
def prompts(source_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(source_dir), local_files_only=True)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def hf_reference(source_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' own generate, greedy, on the same weights."""
    hf = LlamaForCausalLM.from_pretrained(str(source_dir), local_files_only=True).eval()
    out = []
    for ids in prompts[:3]:
        x = torch.tensor([ids])
        # an explicit mask: the prompt holds <|im_end|>, which is also the pad token
        gen = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


def _engine_greedy(model: RecursiveLM, prompts: list[list[int]], batching: str) -> list[list[int]]:
    engine = Engine(model, EngineConfig(batching=batching, num_blocks=256))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    out = engine.generate({f"p{i}": ids for i, ids in enumerate(prompts)}, params)
    return [out[f"p{i}"][0] for i in range(len(prompts))]


def test_vanilla_greedy_equals_transformers_generate(
    source_dir: Path, prompts: list[list[int]], hf_reference: list[list[int]]
) -> None:
    vanilla = load_model(source_dir)
    assert vanilla.config.is_vanilla
    assert _engine_greedy(vanilla, prompts[:3], "sequence") == hf_reference
    assert greedy_generate(vanilla, prompts[0], 8) == hf_reference[0][:8]


@pytest.mark.parametrize("path", ["dense", "lowrank"])
def test_exact_default_equals_transformers_generate(
    path: str, default_dir: Path, prompts: list[list[int]], hf_reference: list[list[int]]
) -> None:
    rrt = load_model(default_dir)
    assert rrt.config.loops == 3 and rrt.config.block_layers == 10
    meta = json.loads((default_dir / "loopserve.json").read_text())
    fidelity = meta["provenance"]["fidelity"]
    assert fidelity["agreement"] == 1.0 and fidelity["kl"] < 1e-6
    if path == "dense":
        assert len(materialise_high_rank(rrt)) == 7
        assert _engine_greedy(rrt, prompts[:3], "depth") == hf_reference
    else:  # full-rank factors through the LoRA path: slower on the CPU, so one prompt
        assert _engine_greedy(rrt, prompts[:1], "depth") == hf_reference[:1]


def test_rank64_conversion_prints_fidelity(
    source_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "convert",
            str(source_dir),
            "--loops",
            "3",
            "--init",
            "average",
            "--rank",
            "64",
            "--out",
            str(tmp_path / "r64"),
            "--json",
            str(tmp_path / "r64.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fidelity: perplexity source" in printed and "saved" in printed
    report = json.loads((tmp_path / "r64.json").read_text())
    assert report["report"]["converted_params"] < report["report"]["source_params"]
    assert 0.0 <= report["fidelity"]["agreement"] < 0.5  # untrained: destroyed, as measured


def _serve_all(model: RecursiveLM, prompts: list[list[int]], batching: str) -> list[list[int]]:
    async def run() -> list[list[int]]:
        cfg = EngineConfig(batching=batching, num_blocks=512, max_num_batched_tokens=256)
        front = AsyncEngine(lambda: Engine(model, cfg))
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)

        async def one(i: int, ids: list[int]) -> list[int]:
            return [t async for o in front.generate(f"q{i}", ids, params) for t in o.token_ids]

        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            await front.shutdown(grace_seconds=1)

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["vanilla", "recursive"])
def test_eight_concurrent_requests_through_async_engine(
    kind: str,
    source_dir: Path,
    default_dir: Path,
    prompts: list[list[int]],
    hf_reference: list[list[int]],
) -> None:
    model = load_model(source_dir if kind == "vanilla" else default_dir)
    materialise_high_rank(model)
    batching = "sequence" if kind == "vanilla" else "depth"
    outs = _serve_all(model, prompts, batching)
    assert len(outs) == 8 and all(outs)
    for got, want in zip(outs, hf_reference, strict=False):
        stop = want.index(2) + 1 if 2 in want else len(want)  # the engine stops at EOS
        assert got == want[:stop]
