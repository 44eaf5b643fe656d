"""Serving transforms: fused projections and dense per-depth weights keep the logits and the
engine's tokens, and free the weights they replace."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loopserve_kernels import PackedWeight, packing_supported
from model.checkpoint import load_model, save_checkpoint
from model.config import FULL_RANK, LINEAR_MODULES
from model.convert import convert
from model.generate import greedy_generate
from model.packed_projection import PackedProjection
from model.recursive import RecursiveLM
from model.serving import fuse_projections, materialise_high_rank, prepare_for_serving
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
        plan = prepare_for_serving(model)
        assert plan.fused == [("q", "k", "v"), ("gate", "up")], name
        assert bool(plan.dense) == (name == "full-rank-dense"), name
        # float32 weights are packed for oneDNN where it is built (the CPU path)
        assert bool(plan.packed) == packing_supported(model.embed[:1]), name
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
        """Bytes of every distinct storage, packed weights (opaque oneDNN tensors) at their
        logical size."""
        tensors = list(model.parameters()) + list(model.dense.values())
        packed: list[PackedWeight] = [model.packed_head] if model.packed_head else []
        for f in model.fused.values():
            if isinstance(f, PackedProjection):
                packed += [w for ws in f.weights for w in ws]
                continue
            tensors += [t for t in (f.dense, f.weight) if t is not None]
            packed += f.packed or []
            packed += [
                w for ds in f.packed_lora or [] for d in ds for w in (d.shrink, *d.expands) if w
            ]
        seen, total = set(), 0
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        for w in {id(w): w for w in packed}.values():
            total += w.out_features * w.in_features * w.dtype.itemsize
        return total

    assert exact.checkpoint_parameters > 1.5 * vanilla.checkpoint_parameters
    assert resident(exact) <= 1.1 * resident(vanilla)


def test_dense_only_for_high_rank(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    model = _variants(tiny_hf)["rank4"]
    assert materialise_high_rank(model) == []
    with pytest.raises(KeyError):
        _ = model.dense["q"]


@pytest.mark.skipif(
    not packing_supported(torch.zeros(1, 1, dtype=torch.bfloat16)),
    reason="this CPU has no native bf16 GEMMs (nothing is packed here)",
)
@torch.no_grad()
@pytest.mark.parametrize("name", ["vanilla", "mixed-ranks", "full-rank-dense"])
@pytest.mark.parametrize("batching", ["sequence", "depth"])
def test_packed_weights_keep_logits_and_tokens(
    tiny_hf: tuple[Path, LlamaForCausalLM], name: str, batching: str
) -> None:
    """bf16 weights packed for the CPU GEMM give the unpacked model's logits and engine tokens
    — shared weights with low-rank deltas included — with exits at every depth in depth mode,
    so fills run through the packed k|v tail."""
    model = _variants(tiny_hf)[name].to(torch.bfloat16)
    ref = copy.deepcopy(model)
    materialise_high_rank(ref)
    fuse_projections(ref)
    plan = prepare_for_serving(model)
    # every group is packed; groups with deltas keep them beside the packed shared weight
    want = [("q", "k", "v"), ("gate", "up"), ("o",), ("down",), ("lm_head",)]
    assert plan.packed == want
    assert model.has_dense_weights == ref.has_dense_weights
    ids = _ids(101)
    torch.testing.assert_close(model(ids), ref(ids), atol=0, rtol=0)
    loops = model.config.loops
    cfg = EngineConfig(
        block_size=4,
        num_blocks=256,
        max_model_len=64,
        batching=batching,
        depth_alignment="mixed",
        forced_exit_weights=(1.0,) * loops if batching == "depth" and loops > 1 else (),
    )
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": _ids(101, seed=i)[0, : 5 + i].tolist() for i in range(4)}
    got = Engine(model, cfg).generate(prompts, params)
    assert got == Engine(ref, cfg).generate(prompts, params)


@torch.no_grad()
def test_bf16_exact_conversion_serves_its_sources_bf16_weights(
    tiny_hf: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    """Loaded in bf16 as the server loads it, an exact conversion's dense per-depth weights
    are summed from the checkpoint's float32 factors and rounded once: the source's own bf16
    weights (of a source whose weights are bf16 values) but where the float32 factors rebuild
    a weight on the other side of a rounding edge, and the source's greedy tokens served in
    bf16. Summed from bf16-rounded factors instead, two in five weights differ."""
    source = load_model(tiny_hf[0])
    for p in source.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    full = dict.fromkeys(LINEAR_MODULES, FULL_RANK)
    exact = convert(copy.deepcopy(source), 3, "average", full, progress=False)[0]
    directory = save_checkpoint(exact, tmp_path / "exact")
    k_ = exact.config.block_layers

    def mismatched(keep: bool) -> float:
        model = load_model(directory, dtype=torch.bfloat16, keep_full_precision=keep)
        switched = materialise_high_rank(model)
        assert sorted(switched) == sorted(LINEAR_MODULES) and not model.full_precision
        bad = total = 0
        for m in switched:
            for k in range(k_):
                for b in range(3):
                    want = source.weights[m][b * k_ + k].to(torch.bfloat16)
                    bad += int((model.dense[m][k, b] != want).sum())
                    total += want.numel()
        return bad / total

    assert mismatched(keep=True) <= 1e-3
    assert mismatched(keep=False) > 0.1
    vanilla = copy.deepcopy(source).to(torch.bfloat16)
    served = load_model(directory, dtype=torch.bfloat16, keep_full_precision=True)
    for model in (vanilla, served):
        prepare_for_serving(model)
    cfg = EngineConfig(block_size=4, num_blocks=128, max_model_len=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = {f"p{i}": _ids(101, seed=i)[0, :9].tolist() for i in range(4)}
    assert Engine(served, cfg).generate(prompts, params) == Engine(vanilla, cfg).generate(
        prompts, params
    )
