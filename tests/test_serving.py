"""Serving transforms: fused projections and dense per-depth weights keep the logits and the
engine's tokens, and free the weights they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.checkpoint import load_model
from model.config import FULL_RANK, LINEAR_MODULES
from model.convert import convert
from model.generate import greedy_generate
from model.recursive import RecursiveLM
from model.serving import materialise_high_rank, prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(seed))


def _variants(tiny_hf: tuple[Path, LlamaForCausalLM]) -> dict[str, RecursiveLM]:
    d = tiny_hf[0]
    full = dict.fromkeys(LINEAR_MODULES, FULL_RANK)
    mixed = {m: (4 if m in ("q", "k", "v", "gate") else 0) for m in LINEAR_MODULES}
    return {
        "vanilla": load_model(d),
        "rank4": convert(
            load_model(d), 3, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
        )[0],
        "mixed-ranks": convert(load_model(d), 2, "average", mixed, progress=False)[0],
        "full-rank-dense": convert(load_model(d), 3, "average", full, progress=False)[0],
    }


@torch.no_grad()
def test_fused_projections_keep_logits_and_tokens(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    for name, model in _variants(tiny_hf).items():
        ids = _ids(101)
        want = model(ids)
        prompt = ids[0, :9].tolist()
        tokens = greedy_generate(model, prompt, 6)
        dense, fused = prepare_for_serving(model)
        assert fused == [("q", "k", "v"), ("gate", "up")], name
        assert bool(dense) == (name == "full-rank-dense"), name
        torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=0, msg=name)
        cfg = EngineConfig(block_size=4, num_blocks=128, max_model_len=64)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        assert Engine(model, cfg).generate({"a": prompt}, params)["a"][0] == tokens, name


@torch.no_grad()
def test_qwen2_biases_survive_fusion(tmp_path: Path) -> None:
    cfg = Qwen2Config(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    for p in hf.parameters():
        p.normal_(0.0, 0.08)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = _ids(101)
    prepare_for_serving(model)
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_serving_frees_what_it_replaced(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    """The exact (full-rank) conversion served holds the original's linear weights once: the
    shared weights and factors behind its dense weights are gone."""
    variants = _variants(tiny_hf)
    vanilla, exact = variants["vanilla"], variants["full-rank-dense"]
    for m in (vanilla, exact):
        prepare_for_serving(m)

    def resident(model: RecursiveLM) -> int:
        tensors = list(model.parameters()) + list(model.dense.values())
        for f in model.fused.values():
            tensors += [t for t in (f.dense, getattr(f, "weight", None)) if t is not None]
        seen, total = set(), 0
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    assert exact.checkpoint_parameters > 1.5 * vanilla.checkpoint_parameters
    assert resident(exact) <= 1.1 * resident(vanilla)


def test_dense_only_for_high_rank(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    model = _variants(tiny_hf)["rank4"]
    assert materialise_high_rank(model) == []
    with pytest.raises(KeyError):
        _ = model.dense["q"]
