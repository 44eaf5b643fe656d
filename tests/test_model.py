"""The model against transformers' own Llama/Qwen2 and against hand-built references."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.attention import CausalAttention
from model.checkpoint import load_model, save_checkpoint
from model.config import FULL_RANK, INIT_METHODS, LINEAR_MODULES
from model.convert import convert, stepwise_indices
from model.recursive import RecursiveLM
from model.serving import materialise_high_rank
from tests.conftest import tiny_llama_config, write_hf_model


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    """Inference only here; scoped so other test modules keep autograd."""
    with torch.no_grad():
        yield


def _ids(vocab: int, n: int = 2, s: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    lp, lq = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 1},
        {"head_dim": 16},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        },
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0},
    ],
    ids=["tied-gqa", "untied", "mqa", "head_dim", "llama3-rope", "linear-rope"],
)
def test_vanilla_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    hf = write_hf_model(tmp_path, tiny_llama_config(**overrides))
    ids = _ids(hf.config.vocab_size, s=40)
    ours = load_model(tmp_path)
    assert ours.config.is_vanilla
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_qwen2_bias_logits_match_transformers(tmp_path: Path) -> None:
    cfg = Qwen2Config(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    for name, p in hf.named_parameters():
        p.normal_(0.0, 0.08) if not name.endswith("norm.weight") else p.fill_(1.1)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.arch.attention_bias
    ids = _ids(101)
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    _, hf = tiny_hf
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = _ids(101)
    torch.testing.assert_close(load_model(tmp_path)(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", INIT_METHODS)
@pytest.mark.parametrize("loops", [2, 3])
def test_full_rank_reproduces_source(
    tiny_hf: tuple[Path, LlamaForCausalLM], init: str, loops: int
) -> None:
    d, hf = tiny_hf
    converted, report = convert(
        load_model(d), loops, init, dict.fromkeys(LINEAR_MODULES, FULL_RANK), progress=False
    )
    assert converted.config.loops == loops and converted.config.block_layers == 6 // loops
    assert all(abs(e - 1.0) < 1e-9 for e in report.energy_kept.values())
    ids = _ids(101)
    diff = (converted(ids) - hf(ids).logits).abs().max()
    assert diff <= 1e-4, f"{init}/{loops} loops: max abs logit diff {diff}"


def test_rank0_stepwise_equals_hand_built_recursive_model(
    tiny_hf: tuple[Path, LlamaForCausalLM],
) -> None:
    """Independent reference: a transformers Llama whose layer p carries the linear weights of
    original layer idx[p mod K] (stepwise selection) and the norms of original layer p."""
    d, hf = tiny_hf
    loops, n_layers = 3, 6
    k = n_layers // loops
    idx = stepwise_indices(n_layers, k)
    assert idx == [0, 5]
    ref = copy.deepcopy(hf)
    for p, layer in enumerate(ref.model.layers):
        src = hf.model.layers[idx[p % k]]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, proj).weight.copy_(getattr(src.self_attn, proj).weight)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, proj).weight.copy_(getattr(src.mlp, proj).weight)
    converted, _ = convert(load_model(d), loops, "stepwise", {}, progress=False)
    assert not converted.lora_a
    ids = _ids(101)
    torch.testing.assert_close(converted(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_average_init_is_per_slot_mean(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    d, hf = tiny_hf
    converted, _ = convert(load_model(d), 2, "average", {}, progress=False)
    layers = hf.model.layers
    for k in range(3):
        want = (layers[k].mlp.down_proj.weight + layers[k + 3].mlp.down_proj.weight) / 2
        torch.testing.assert_close(converted.weights["down"][k], want, atol=1e-7, rtol=0)
        want_q = (layers[k].self_attn.q_proj.weight + layers[k + 3].self_attn.q_proj.weight) / 2
        torch.testing.assert_close(converted.weights["q"][k], want_q, atol=1e-7, rtol=0)
        # norms stay per position: loop b at block layer k is original layer k + 3b
        for b in range(2):
            torch.testing.assert_close(
                converted.input_norm[k, b], layers[k + 3 * b].input_layernorm.weight
            )


def test_kl_falls_as_rank_grows(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    d, hf = tiny_hf
    source = load_model(d)
    ids = _ids(101, n=4, s=32)
    ref = hf(ids).logits
    kls = []
    for rank in (0, 8, 24, FULL_RANK):
        converted, _ = convert(
            source, 3, "average", dict.fromkeys(LINEAR_MODULES, rank), progress=False
        )
        kls.append(_kl(ref, converted(ids)))
    assert kls[0] > kls[1] > kls[2] > kls[3], kls
    assert kls[3] < 1e-6 < kls[2], kls


def test_rank_above_full_is_rejected(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    d, _ = tiny_hf
    with pytest.raises(ValueError, match="exceeds its full rank"):
        convert(load_model(d), 3, "average", dict.fromkeys(LINEAR_MODULES, 49), progress=False)


@pytest.fixture(scope="module")
def relaxed(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    d, _ = tiny_hf
    return convert(load_model(d), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False)[0]


def test_per_row_depth_block_forward_equals_rows_alone(relaxed: RecursiveLM) -> None:
    """Three sequences at depths 0, 2, 1 in one ragged call == each alone at its depth."""
    torch.manual_seed(3)
    lens, depths = [5, 9, 3], [0, 2, 1]
    hidden = [torch.randn(n, 48) for n in lens]
    positions = [torch.arange(n) + 4 for n in lens]
    depth_rows = torch.cat([torch.full((n,), b) for n, b in zip(lens, depths, strict=True)])
    batched = relaxed.block_forward(
        torch.cat(hidden), depth_rows, torch.cat(positions), CausalAttention(lens)
    )
    alone = [
        relaxed.block_forward(h, torch.full((len(h),), b), p, CausalAttention([len(h)]))
        for h, p, b in zip(hidden, positions, depths, strict=True)
    ]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # and the int-depth fast path agrees with the per-row path
    same = relaxed.block_forward(hidden[1], 2, positions[1], CausalAttention([9]))
    torch.testing.assert_close(alone[1], same, atol=1e-5, rtol=1e-5)


def test_truncated_loops_use_their_own_deltas(
    relaxed: RecursiveLM, tiny_hf: tuple[Path, LlamaForCausalLM]
) -> None:
    """Independent reference: a transformers Llama of 2·K layers whose layer p = k + b·K holds
    ``W[k] + B[k, b] A[k, b]`` and the norms of position p — what two loops must compute."""
    _, hf = tiny_hf
    k_layers, loops = relaxed.config.block_layers, 2
    ref = copy.deepcopy(hf)
    ref.model.layers = ref.model.layers[: k_layers * loops]
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
    names |= {"o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj"}
    names |= {"down": "mlp.down_proj"}
    for p, layer in enumerate(ref.model.layers):
        k, b = p % k_layers, p // k_layers
        for m, name in names.items():
            w = relaxed.weights[m][k] + relaxed.lora_b[m][k, b] @ relaxed.lora_a[m][k, b]
            layer.get_submodule(name).weight.copy_(w)
        layer.input_layernorm.weight.copy_(relaxed.input_norm[k, b])
        layer.post_attention_layernorm.weight.copy_(relaxed.post_attn_norm[k, b])
    ref.model.embed_tokens.weight.copy_(relaxed.embed)
    ref.model.norm.weight.copy_(relaxed.final_norm)
    ids = _ids(101)
    torch.testing.assert_close(relaxed(ids, num_loops=loops), ref(ids).logits, atol=1e-4, rtol=0)
    states = relaxed.loop_hidden_states(ids)
    assert len(states) == 3 and not torch.allclose(states[1], states[2])
    with pytest.raises(ValueError, match="num_loops"):
        relaxed(ids, num_loops=4)


def test_save_load_round_trip_is_bit_exact(tmp_path: Path, relaxed: RecursiveLM) -> None:
    save_checkpoint(relaxed, tmp_path, provenance={"note": "test"})
    loaded = load_model(tmp_path)
    assert loaded.config == relaxed.config
    for name, t in relaxed.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = _ids(101)
    assert torch.equal(loaded(ids), relaxed(ids))


def test_dense_materialisation_keeps_logits(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    d, hf = tiny_hf
    ranks = {"q": FULL_RANK, "k": 2, "gate": FULL_RANK, "down": 40}
    converted, _ = convert(load_model(d), 3, "average", ranks, progress=False)
    ids = _ids(101)
    before = converted(ids)
    assert sorted(materialise_high_rank(converted)) == ["down", "gate", "q"]
    assert converted.dense["q"].shape == (2, 3, 48, 48)
    torch.testing.assert_close(converted(ids), before, atol=1e-5, rtol=1e-5)
    full, _ = convert(
        load_model(d), 3, "lower", dict.fromkeys(LINEAR_MODULES, FULL_RANK), progress=False
    )
    materialise_high_rank(full)
    assert set(full.dense) == set(LINEAR_MODULES)
    torch.testing.assert_close(full(ids), hf(ids).logits, atol=1e-4, rtol=0)
