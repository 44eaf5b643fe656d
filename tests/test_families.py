"""The paper's families (TinyLlama-shaped Llama, GPT-NeoX/Pythia, Gemma 3) against
transformers' own implementations on random weights: loading, conversion, serving."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from model.build import convert_checkpoint
from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import FULL_RANK, INIT_METHODS, LINEAR_MODULES, ConfigError
from model.convert import convert
from model.generate import greedy_generate
from model.reconstruct import LayerMath, fitted_layer, source_position
from model.recursive import RecursiveLM
from model.rope import rope_cos_sin
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from server.settings import ServeSettings
from tests.conftest import tiny_llama_config, write_hf_model
from tests.server_support import SPECIALS, WORDS, LiveServer, write_tiny_tokenizer
from tests.test_exit_oracle import _prompts, _run_engine, _thresholds, oracle_decode

ATOL = 1e-4  # what the Llama parity tests use
FULL = dict.fromkeys(LINEAR_MODULES, FULL_RANK)


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _ids(vocab: int, n: int = 2, s: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomise(model: PreTrainedModel, seed: int, offset_norms: bool = False) -> None:
    """Random weights with non-trivial norms and biases; Gemma's norms store w of (1 + w)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm.weight" in name:
            p.copy_((0.0 if offset_norms else 1.0) + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.08)


def _write(directory: Path, model: PreTrainedModel) -> PreTrainedModel:
    model.eval().save_pretrained(directory)
    return model


def tinyllama_config() -> PretrainedConfig:
    """TinyLlama's shape where it matters (22 layers, 4 KV heads, 32k vocabulary), tiny
    elsewhere: 22 has no divisor but 2 and 11, so most loop counts must be refused."""
    return tiny_llama_config(
        vocab_size=32000,
        num_hidden_layers=22,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )


def neox_config(**overrides: object) -> GPTNeoXConfig:
    kw: dict[str, object] = {
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "use_parallel_residual": True,
        "hidden_act": "gelu",
    }
    kw.update(overrides)
    partial = kw.pop("partial_rotary_factor", 0.25)
    kw["rope_parameters"] = {**kw["rope_parameters"], "partial_rotary_factor": partial}
    return GPTNeoXConfig(**kw)


def gemma3_config(**overrides: object) -> Gemma3TextConfig:
    """Interleaved sliding (window 5) and global layers with different RoPE bases, a query
    scale that is not head_dim^-0.5, GQA: every Gemma 3 feature shows within 24 tokens."""
    kw: dict[str, object] = {
        "vocab_size": 211,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "sliding_window": 5,
        "layer_types": ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3,
        "query_pre_attn_scalar": 24,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    }
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def write_neox(d: Path, seed: int = 0, **overrides: object) -> GPTNeoXForCausalLM:
    model = GPTNeoXForCausalLM(neox_config(**overrides))
    _randomise(model, seed)
    return _write(d, model)


def write_gemma3(d: Path, seed: int = 0, **overrides: object) -> Gemma3ForCausalLM:
    model = Gemma3ForCausalLM(gemma3_config(**overrides))
    _randomise(model, seed, offset_norms=True)
    return _write(d, model)


@pytest.fixture(scope="module")
def tinyllama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedModel]:
    d = tmp_path_factory.mktemp("tinyllama")
    return d, write_hf_model(d, tinyllama_config())


@pytest.fixture(scope="module")
def neox(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedModel]:
    d = tmp_path_factory.mktemp("neox")
    return d, write_neox(d)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedModel]:
    d = tmp_path_factory.mktemp("gemma3")
    return d, write_gemma3(d)


FAMILIES = ("tinyllama", "neox", "gemma3")


def _family(request: pytest.FixtureRequest, name: str) -> tuple[Path, PreTrainedModel]:
    return request.getfixturevalue(name)


# --- logits parity ---------------------------------------------------------------------------


def test_tinyllama_logits_match_transformers(tinyllama: tuple[Path, PreTrainedModel]) -> None:
    d, hf = tinyllama
    ours = load_model(d)
    a = ours.config.arch
    assert (a.num_layers, a.num_kv_heads, a.vocab_size) == (22, 4, 32000)
    ids = _ids(32000, s=40)
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_parallel_residual": False},
        {"partial_rotary_factor": 1.0, "hidden_act": "gelu_new"},
        {"attention_bias": False, "tie_word_embeddings": True},
    ],
    ids=["pythia", "sequential-residual", "full-rotary-tanh", "no-attn-bias-tied"],
)
def test_gpt_neox_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    hf = write_neox(tmp_path, **overrides)
    ours = load_model(tmp_path)
    a = ours.config.arch
    assert a.norm == "layer" and not a.gated_mlp and "gate" not in ours.weights
    assert a.parallel_residual == hf.config.use_parallel_residual
    ids = _ids(97, s=40)
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sliding_window": 3, "query_pre_attn_scalar": 16},
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
            }
        },
    ],
    ids=["window5", "window3", "linear-rope-global"],
)
def test_gemma3_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    hf = write_gemma3(tmp_path, **overrides)
    ours = load_model(tmp_path)
    a = ours.config.arch
    assert a.qk_norm and a.sandwich_norm and a.norm == "rms_offset"
    assert a.layer_windows[2] == 0 and a.layer_windows[0] == hf.config.sliding_window
    ids = _ids(211, s=40)
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_gemma3_window_matters(gemma3: tuple[Path, PreTrainedModel]) -> None:
    """Break-check: the same weights with every layer global give other logits."""
    d, _ = gemma3
    ours = load_model(d)
    ids = _ids(211, s=24)
    want = ours(ids)
    ours.windows = None
    assert (ours(ids) - want).abs().max() > 1e-2


# --- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_conversion_is_exact(request: pytest.FixtureRequest, family: str) -> None:
    d, hf = _family(request, family)
    source = load_model(d)
    vocab = source.config.arch.vocab_size
    ids = _ids(vocab)
    ref = hf(ids).logits
    loops = (2, 11) if family == "tinyllama" else (2, 3)
    for b in loops:
        for init in INIT_METHODS:
            converted, _ = convert(source, b, init, FULL, progress=False)
            diff = float((converted(ids) - ref).abs().max())
            assert diff <= ATOL, f"{family} B={b} {init}: max abs logit diff {diff}"


def test_conversion_refuses_loops_that_do_not_divide_the_depth(
    tinyllama: tuple[Path, PreTrainedModel],
) -> None:
    source = load_model(tinyllama[0])
    with pytest.raises(ConfigError, match=r"num_hidden_layers=22 is not divisible by loops=3.*11"):
        convert(source, 3, "average", FULL, progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruct_layer_math_is_the_models(request: pytest.FixtureRequest, family: str) -> None:
    """The conversion's own copy of the layer (model.reconstruct: forward for the polish,
    fitted_layer for the fits) run over every source layer gives transformers' logits."""
    d, hf = _family(request, family)
    source = load_model(d)
    ids = _ids(source.config.arch.vocab_size, n=2, s=24)
    lm = LayerMath(source.config.arch, 24, 2)
    h = hh = source.embed_tokens(ids.reshape(-1))
    for p in range(source.config.arch.num_layers):
        pw = source_position(source, p)
        h = lm.forward(pw, h)
        keep = lambda m, x, xh, pw=pw: pw.weights[m]  # noqa: E731 (fit nothing: the source)
        _, hh = fitted_layer(lm, pw, replace(pw, weights=dict(pw.weights)), hh, hh, keep)
    ref = hf(ids).logits
    for out in (h, hh):
        torch.testing.assert_close(source.logits(out).view(ref.shape), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_data_aware_deltas_exact_at_full_rank_and_better_below(
    request: pytest.FixtureRequest, family: str
) -> None:
    """The data-aware methods re-run each family's layer math (model.reconstruct): exact at
    full rank, and at rank 8 closer to the source than the weight-space SVD on the calibration
    windows (logit RMS error): a layer math that differed from the model's would fit the
    wrong outputs and lose that."""
    d, hf = _family(request, family)
    source = load_model(d)
    vocab = source.config.arch.vocab_size
    calibration = _ids(vocab, n=32, s=32, seed=7)
    ids = _ids(vocab)
    ref = hf(ids).logits
    for method in ("whitened", "sequential"):
        converted, _ = convert(
            source, 2, "average", FULL, progress=False, method=method, calibration=calibration
        )
        diff = float((converted(ids) - ref).abs().max())
        assert diff <= ATOL, f"{family} {method} full rank: max abs logit diff {diff}"
    seen = calibration[:8]
    want = source(seen)
    err = {}
    for method in ("plain", "whitened", "sequential"):
        low = dict.fromkeys(LINEAR_MODULES, 8)
        converted, _ = convert(
            source, 2, "average", low, progress=False, method=method, calibration=calibration
        )
        err[method] = float((converted(seen) - want).pow(2).mean().sqrt())
    assert err["whitened"] < 0.9 * err["plain"] and err["sequential"] < 0.9 * err["plain"], err


@pytest.mark.parametrize("family", ("neox", "gemma3"))
def test_converted_checkpoint_round_trips(
    request: pytest.FixtureRequest, family: str, tmp_path: Path
) -> None:
    d, _ = _family(request, family)
    converted, _ = convert(
        load_model(d), 2, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )
    save_checkpoint(converted, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == converted.config
    ids = _ids(converted.config.arch.vocab_size)
    assert torch.equal(loaded(ids), converted(ids))


def test_rank_for_an_absent_gate_is_dropped(neox: tuple[Path, PreTrainedModel]) -> None:
    converted, _ = convert(
        load_model(neox[0]), 2, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )
    assert converted.config.recursion.ranks["gate"] == 0 and "gate" not in converted.lora_a


def test_softcapping_is_refused(tmp_path: Path) -> None:
    write_gemma3(tmp_path, final_logit_softcapping=30.0)
    with pytest.raises(CheckpointError, match="final_logit_softcapping"):
        load_model(tmp_path)


# --- serving ---------------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _relaxed(d: Path, loops: int) -> RecursiveLM:
    model, _ = convert(
        load_model(d), loops, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batching", ["depth", "sequence"])
def test_engine_equals_cache_free_reference(
    request: pytest.FixtureRequest, family: str, batching: str
) -> None:
    """Paged engine (block size 4, so windows of 5 cross block edges) == the cache-free
    greedy reference, at B = 2 where Gemma's windows and RoPE bases differ by depth."""
    model = _relaxed(_family(request, family)[0], 2)
    vocab = model.config.arch.vocab_size
    rng = random.Random(0)
    prompts = {
        f"r{i}": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))] for i in range(8)
    }
    want = {rid: greedy_generate(model, ids, GREEDY.max_tokens) for rid, ids in prompts.items()}
    prepare_for_serving(model)
    cfg = EngineConfig(
        block_size=4,
        num_blocks=512,
        max_num_batched_tokens=48,
        max_model_len=128,
        batching=batching,
    )
    got = {rid: outs[0] for rid, outs in Engine(model, cfg).generate(prompts, GREEDY).items()}
    assert got == want


@pytest.mark.parametrize("fill", ["propagate", "copy"])
def test_gemma3_mixed_exits_equal_the_per_token_oracle(
    gemma3: tuple[Path, PreTrainedModel], fill: str
) -> None:
    """Early exits at every depth with filled K/V read by later tokens, through windows and
    RoPE bases that differ by depth (B = 2), against tests/test_exit_oracle.py's oracle."""
    model = _relaxed(gemma3[0], 2).to(torch.float64)
    thresholds = _thresholds(model)[:1]
    prompts = _prompts()
    want = {rid: oracle_decode(model, ids, thresholds, fill) for rid, ids in prompts.items()}
    assert {d for o in want.values() for d in o.exit_depths} == {0, 1}
    assert sum(o.fills_read for o in want.values()) > 0, "no later token read a fill"
    got = _run_engine(model, prompts, fill, exit_thresholds=thresholds)
    for rid, o in want.items():
        tokens, exit_depths, logprobs = got[rid]
        assert (tokens, exit_depths) == (o.tokens, o.exit_depths), rid
        torch.testing.assert_close(logprobs, o.logprobs, atol=1e-5, rtol=0)


def test_kv_projection_is_what_the_layer_attends_with(gemma3: tuple[Path, PreTrainedModel]) -> None:
    """The propagate fill's K/V (``kv_projection``) equal the K/V the layer itself hands the
    attention for the same input, rows at mixed depths (per-depth RoPE base and norms)."""
    model = _relaxed(gemma3[0], 2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(
        layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: object = 0
    ) -> torch.Tensor:
        seen.append((k, v))
        return q.flatten(1)

    torch.manual_seed(0)
    hidden = torch.randn(6, 48)
    depth = torch.tensor([0, 1, 1, 0, 1, 0])
    positions = torch.tensor([3, 9, 1, 4, 17, 30])
    tables = [rope_cos_sin(f, positions, hidden.dtype) for f in model.rotary.inv_freqs]
    for layer in range(model.config.block_layers):
        cos, sin = model.rotary.select(tables, layer, depth)
        model.layer_forward(layer, hidden, depth, cos, sin, capture)
        k, v = model.kv_projection(layer, hidden, depth, positions)
        torch.testing.assert_close(k, seen[-1][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(v, seen[-1][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["neox", "gemma3"])
def test_server_greedy_equals_cache_free_reference(tmp_path: Path, family: str) -> None:
    """Five prompts through ``loopserve serve``'s app (a converted B = 2 checkpoint with a
    word-level tokenizer) give the cache-free greedy reference's text."""
    src, out = tmp_path / "hf", tmp_path / "rrt"
    vocab = len(SPECIALS) + len(WORDS)  # every id the model emits decodes
    (write_neox if family == "neox" else write_gemma3)(src, vocab_size=vocab)
    write_tiny_tokenizer(src)
    ranks = dict.fromkeys(LINEAR_MODULES, 4)
    convert_checkpoint(src, out, loops=2, init="average", ranks=ranks, evaluate=False)
    model = load_model(out)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 20))] for _ in range(5)]
    settings = ServeSettings(model=str(out), kv_cache_memory="8MiB", max_model_len=128, threads=1)
    with LiveServer(settings) as live:
        for ids in prompts:
            body = {"model": live.info.name, "prompt": ids, "max_tokens": 6, "temperature": 0}
            body["ignore_eos"] = True
            r = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60)
            r.raise_for_status()
            want = tok.decode(greedy_generate(model, ids, 6))
            assert r.json()["choices"][0]["text"] == want
