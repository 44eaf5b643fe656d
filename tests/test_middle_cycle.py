"""The middle-cycle layout: unique first P and last E layers around the shared block.

Checked against independent references: transformers' logits (full-rank conversion is exact
with every delta method, Llama and Gemma 3 with its per-layer windows and RoPE bases), the
cache-free full-sequence forward (the paged engine's greedy tokens and logprobs, depth- and
sequence-wise), and a per-token oracle that keeps every K/V as a list — the unique layers'
too — in which each token passes the first layers once before loop 0 and the last layers
once, at its exit depth (a prompt's positions at the last loop), under early exits.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from loopserve.cli import main
from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import FULL_RANK, LINEAR_MODULES, ConfigError, ModelConfig, RecursionConfig
from model.convert import CONVERT_METHODS, convert, delta_parameters
from model.exit_heads import ExitHeads
from model.fidelity import measure_fidelity
from model.generate import _batch_logits, _BatchKV, greedy_generate
from model.reconstruct import Polish
from model.recursive import RecursiveLM
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.exit_policy import confidence, forced_exit_depth
from scheduler.sampling import SamplingParams
from tests.conftest import tiny_llama_config, write_hf_model
from tests.test_exit_oracle import MAX_TOKENS, ListAttention, _prompts, _run_engine
from tests.test_families import write_gemma3
from training.uptrain import DEFAULT_GROUPS, mark_trainable

torch.set_num_threads(1)
FULL = dict.fromkeys(LINEAR_MODULES, FULL_RANK)
RANK4 = dict.fromkeys(LINEAR_MODULES, 4)
LAYOUT = {"prefix_layers": 2, "suffix_layers": 1}  # 7 layers: 2 unique, 2 x 2 shared, 1 unique


@pytest.fixture(scope="module")
def tiny7(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    d = tmp_path_factory.mktemp("tiny7")
    return d, write_hf_model(d, tiny_llama_config(num_hidden_layers=7))


@pytest.fixture(scope="module")
def middle(tiny7: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    """B = 2 over the 4 middle layers, rank-4 deltas, float64 so that no confidence sits
    within rounding of a threshold."""
    model, _ = convert(load_model(tiny7[0]), 2, "average", RANK4, progress=False, **LAYOUT)
    return model.to(torch.float64).eval()


def _ids(vocab: int, n: int = 3, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


# --- config ----------------------------------------------------------------------------------


def _arch(layers: int = 7) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "arch": {
                "vocab_size": 11,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_layers": layers,
                "num_heads": 2,
                "num_kv_heads": 1,
            }
        }
    )


@pytest.mark.parametrize(
    ("recursion", "message"),
    [
        ({"prefix_layers": -1}, "prefix_layers must be an integer >= 0"),
        ({"suffix_layers": "1"}, "suffix_layers must be an integer >= 0"),
        ({"suffix_layers": True}, "suffix_layers must be an integer >= 0"),
        ({"prefix_layers": 4, "suffix_layers": 3}, "leave none of the 7 layers to share"),
        ({"loops": 2, "prefix_layers": 2}, r"5 shared layers are not divisible by loops=2"),
        ({"loops": 3, "prefix_layers": 3}, r"4 shared layers.*loops that divide 4: \[1, 2, 4\]"),
    ],
)
def test_invalid_layouts_are_refused(recursion: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _arch().with_recursion(RecursionConfig(**recursion))


def test_layout_serialises_and_old_configs_load_as_full_cycle() -> None:
    config = _arch().with_recursion(RecursionConfig(loops=2, **LAYOUT))
    d = config.to_dict()
    assert (d["recursion"]["prefix_layers"], d["recursion"]["suffix_layers"]) == (2, 1)
    again = ModelConfig.from_dict(json.loads(json.dumps(d)))
    assert again == config
    assert (again.block_layers, again.shared_layers) == (2, 4)
    assert not again.with_recursion(RecursionConfig(prefix_layers=1)).is_vanilla
    for key in ("prefix_layers", "suffix_layers"):
        del d["recursion"][key]
    d["recursion"]["loops"] = 7
    old = ModelConfig.from_dict(d)  # a checkpoint from before the layout: the full cycle
    assert (old.prefix_layers, old.suffix_layers, old.block_layers) == (0, 0, 1)


def test_conversion_refuses_a_layout_that_does_not_fold(
    tiny7: tuple[Path, LlamaForCausalLM],
) -> None:
    with pytest.raises(ConfigError, match="5 shared layers are not divisible by loops=2"):
        convert(load_model(tiny7[0]), 2, "average", FULL, progress=False, prefix_layers=2)


# --- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CONVERT_METHODS)
@pytest.mark.parametrize(("loops", "prefix", "suffix"), [(2, 2, 1), (3, 1, 0), (2, 0, 1)])
def test_full_rank_middle_cycle_is_exact(
    tiny7: tuple[Path, LlamaForCausalLM], method: str, loops: int, prefix: int, suffix: int
) -> None:
    d, hf = tiny7
    calib = None if method == "plain" else _ids(101, 16, 32, seed=1)
    model, report = convert(
        load_model(d),
        loops,
        "average",
        FULL,
        progress=False,
        method=method,
        calibration=calib,
        prefix_layers=prefix,
        suffix_layers=suffix,
    )
    assert (report.prefix_layers, report.suffix_layers) == (prefix, suffix)
    ids = _ids(101)
    with torch.no_grad():
        diff = float((model(ids) - hf(ids).logits).abs().max())
    assert diff < 1e-4, f"{method} B={loops} P={prefix} E={suffix}: max |Δlogit| {diff:.2e}"


def test_data_aware_deltas_beat_plain_svd_below_full_rank(
    tiny7: tuple[Path, LlamaForCausalLM],
) -> None:
    """Fitted on the unique first layers' outputs, the deltas cut plain SVD's logit error on
    inputs they were not fitted on."""
    source = load_model(tiny7[0])
    held_out = _ids(101, 8, 32)
    with torch.no_grad():
        ref = source(held_out)
    err = {}
    for method in CONVERT_METHODS:
        calib = None if method == "plain" else _ids(101, 24, 32, seed=1)
        model, _ = convert(
            source, 2, "average", RANK4, progress=False, method=method, calibration=calib, **LAYOUT
        )
        with torch.no_grad():
            err[method] = float((model(held_out) - ref).pow(2).mean().sqrt())
    assert err["whitened"] < 0.9 * err["plain"], err
    assert err["sequential"] < 0.9 * err["plain"], err


def test_rank_exceptions_budget_and_polish_count_block_positions(
    tiny7: tuple[Path, LlamaForCausalLM],
) -> None:
    """Positions p are the block's (original layer 2 + p): an exception at 0 reproduces layer
    2; the budget is spent over the 4 block positions; the polish refits them."""
    source = load_model(tiny7[0])
    calib = _ids(101, 16, 32, seed=1)
    kw = {"progress": False, "method": "sequential", "calibration": calib, **LAYOUT}
    exact0, _ = convert(source, 2, "average", RANK4, position_ranks={0: FULL_RANK}, **kw)
    for m in LINEAR_MODULES:
        w = exact0.weights[m][0] + exact0.lora_b[m][0, 0] @ exact0.lora_a[m][0, 0]
        torch.testing.assert_close(w, source.weights[m][2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position 4: the model has 4"):
        convert(source, 2, "average", RANK4, position_ranks={4: 1}, **kw)
    config = exact0.config
    budget = delta_parameters(config, {m: [2] * 4 for m in LINEAR_MODULES})
    _, report = convert(source, 2, "average", {}, rank_budget=budget, **kw)
    assert all(len(row) == 4 for row in report.position_ranks.values())
    assert 0 < delta_parameters(config, report.position_ranks) <= budget
    base, _ = convert(source, 2, "average", RANK4, **kw)
    polished, _ = convert(source, 2, "average", RANK4, polish=Polish(20, 60.0, 1e-3), **kw)
    assert not torch.equal(base.lora_a["q"], polished.lora_a["q"])
    assert measure_fidelity(source, polished, calib).kl < measure_fidelity(source, base, calib).kl


def test_full_rank_middle_cycle_is_exact_for_gemma3(tmp_path: Path) -> None:
    """Gemma 3's windows and RoPE bases follow each unique layer's and each block position's
    original layer (layers 1..4 fold as 2 x 2, sliding and global differing by depth)."""
    hf = write_gemma3(tmp_path)
    model, _ = convert(
        load_model(tmp_path), 2, "average", FULL, progress=False, prefix_layers=1, suffix_layers=1
    )
    assert model.windows is not None and model.suffix is not None
    assert model.windows.rows == [[5, 5], [0, 5]]
    ids = _ids(211)
    with torch.no_grad():
        diff = float((model(ids) - hf(ids).logits).abs().max())
    assert diff < 1e-4, diff


def test_unique_layers_are_copied_exactly(
    tiny7: tuple[Path, LlamaForCausalLM], middle: RecursiveLM
) -> None:
    source = load_model(tiny7[0]).to(torch.float64)
    assert middle.prefix is not None and middle.suffix is not None
    for stack, layers in ((middle.prefix, [0, 1]), (middle.suffix, [6])):
        assert not stack.lora_a
        for m in LINEAR_MODULES:
            assert torch.equal(stack.weights[m], source.weights[m][layers])
        assert torch.equal(stack.input_norm, source.input_norm[layers])
        assert torch.equal(stack.post_attn_norm, source.post_attn_norm[layers])


def test_parameter_count_includes_the_unique_layers(tiny7: tuple[Path, LlamaForCausalLM]) -> None:
    """Rank 0: embeddings and final norm, 3 whole source layers, 2 shared layers' weights and
    4 positions' norms."""
    source = load_model(tiny7[0])
    model, report = convert(
        source, 2, "average", dict.fromkeys(LINEAR_MODULES, 0), progress=False, **LAYOUT
    )
    weights = sum(w[0].numel() for w in source.weights.values())
    norms = source.input_norm[0].numel() + source.post_attn_norm[0].numel()
    top = source.embed.numel() + source.final_norm.numel()
    want = top + 3 * (weights + norms) + 2 * weights + 4 * norms
    assert model.num_parameters() == report.converted_params == want


def test_cli_converts_middle_cycle(
    tmp_path: Path, tiny7: tuple[Path, LlamaForCausalLM], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mid"
    args = ["convert", str(tiny7[0]), "--loops", "2", "--method", "plain", "--rank", "full"]
    rc = main([*args, "--layout", "middle", "--prefix-layers", "2", "--out", str(out), "--no-eval"])
    assert rc == 0
    assert "middle-cycle: 2 first, 1 last unique" in capsys.readouterr().out
    model = load_model(out)
    assert (model.config.prefix_layers, model.config.suffix_layers) == (2, 1)
    ids = _ids(101)
    with torch.no_grad():
        assert float((model(ids) - tiny7[1](ids).logits).abs().max()) < 1e-4
    assert main([*args, "--prefix-layers", "2", "--out", str(out), "--no-eval"]) == 2
    assert "need --layout middle" in capsys.readouterr().err
    both = ["--prefix-layers", "0", "--suffix-layers", "0"]
    assert main([*args, "--layout", "middle", *both, "--out", str(out), "--no-eval"]) == 2
    assert "not all 0" in capsys.readouterr().err


def test_uptraining_trains_the_unique_layers_with_the_blocks_groups(middle: RecursiveLM) -> None:
    model = copy.deepcopy(middle)
    assert model.prefix is not None and model.suffix is not None
    stacks = (model.prefix, model.suffix)
    unique = {id(p) for stack in stacks for p in stack.parameters()}
    assert unique <= {id(p) for p in mark_trainable(model, DEFAULT_GROUPS)}
    norms = {id(s.input_norm) for s in stacks} | {id(s.post_attn_norm) for s in stacks}
    assert unique & {id(p) for p in mark_trainable(model, ("norms",))} == norms


# --- checkpoint ------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path, middle: RecursiveLM) -> None:
    save_checkpoint(middle, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "loopserve.json").read_text())
    assert meta["config"]["recursion"]["prefix_layers"] == 2
    loaded = load_model(tmp_path / "ckpt", dtype=torch.float64)
    assert loaded.config == middle.config
    want = middle.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and any(k.startswith("suffix.") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = _ids(101)
    with torch.no_grad():
        assert torch.equal(loaded(ids), middle(ids))


def test_checkpoint_whose_tensors_are_another_layouts_is_refused(
    tmp_path: Path, middle: RecursiveLM
) -> None:
    """A config edited to another layout than its tensors': the unique layers do not match."""
    d = save_checkpoint(middle, tmp_path / "ckpt")
    meta = json.loads((d / "loopserve.json").read_text())
    meta["config"]["recursion"]["prefix_layers"] = 0
    meta["config"]["recursion"]["suffix_layers"] = 3
    (d / "loopserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unexpected \['prefix\.input_norm'"):
        load_model(d)


# --- serving ---------------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _greedy_prompts(vocab: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    return {f"r{i}": [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))] for i in range(8)}


def _engine_outputs(
    model: RecursiveLM,
    prompts: dict[str, list[int]],
    batching: str,
    num_blocks: int = 512,
    prefix_caching: bool = False,
) -> tuple[dict[str, tuple[list[int], list[float]]], Engine]:
    cfg = EngineConfig(
        block_size=4,
        num_blocks=num_blocks,
        max_num_batched_tokens=48,
        max_model_len=128,
        batching=batching,
        enable_prefix_caching=prefix_caching,
    )
    engine = Engine(model, cfg)
    out: dict[str, tuple[list[int], list[float]]] = {rid: ([], []) for rid in prompts}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, GREEDY)
    while engine.has_work:
        for o in engine.step()[0]:
            rid = o.request_id.removesuffix("#0")
            out[rid][0].extend(o.token_ids)
            out[rid][1].extend(s.logprob for s in o.samples)
    return out, engine


@pytest.mark.parametrize("batching", ["depth", "sequence"])
def test_engine_equals_cache_free_forward(middle: RecursiveLM, batching: str) -> None:
    """Greedy tokens and their logprobs from the paged engine (block size 4; the block on the
    serving transforms and the one-call C++ layer, the unique layers on the Python path) equal
    the cache-free forward's over the prompt and the tokens before."""
    ref = copy.deepcopy(middle).float()
    prompts = _greedy_prompts(101)
    want_tokens = {
        rid: greedy_generate(ref, ids, GREEDY.max_tokens) for rid, ids in prompts.items()
    }
    model = copy.deepcopy(ref)
    prepare_for_serving(model)
    assert model.decode_layer is not None, "the block should run the one-call C++ layer"
    got, _ = _engine_outputs(model, prompts, batching)
    for rid, ids in prompts.items():
        tokens, logprobs = got[rid]
        assert tokens == want_tokens[rid], rid
        seq = torch.tensor([ids + tokens])
        with torch.no_grad():
            logp = ref(seq)[0].log_softmax(-1)
        want = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(tokens)]
        torch.testing.assert_close(logprobs, want, atol=1e-4, rtol=0)


def test_gemma3_engine_equals_cache_free_reference(tmp_path: Path) -> None:
    """Windows of 5 across blocks of 4 in the unique layers (sliding) and the block."""
    write_gemma3(tmp_path)
    model, _ = convert(
        load_model(tmp_path), 2, "average", RANK4, progress=False, prefix_layers=1, suffix_layers=1
    )
    prompts = _greedy_prompts(211)
    want = {rid: greedy_generate(model, ids, GREEDY.max_tokens) for rid, ids in prompts.items()}
    prepare_for_serving(model)
    got, _ = _engine_outputs(model, prompts, "depth")
    assert {rid: tokens for rid, (tokens, _) in got.items()} == want


@pytest.mark.parametrize("batching", ["depth", "sequence"])
def test_preempted_and_prefix_cached_requests_equal_the_cache_free_reference(
    middle: RecursiveLM, batching: str
) -> None:
    """Prompts sharing 12 tokens (3 blocks) with the prefix cache on, in a pool too small for
    all at once: recomputed requests and cached blocks bring the unique layers' K/V along."""
    model = copy.deepcopy(middle).float()
    shared = [7, 3, 9, 12, 40, 41, 5, 6, 77, 78, 9, 10]
    prompts = {rid: shared + ids for rid, ids in _greedy_prompts(101).items()}
    want = {rid: greedy_generate(model, ids, GREEDY.max_tokens) for rid, ids in prompts.items()}
    got, engine = _engine_outputs(model, prompts, batching, num_blocks=48, prefix_caching=True)
    assert {rid: tokens for rid, (tokens, _) in got.items()} == want
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.prefix_cache is not None and engine.scheduler.prefix_cache.hits > 0


def test_batched_sampler_logits_are_the_forwards(middle: RecursiveLM) -> None:
    """``sample_continuations``' cached steps pass the unique layers too."""
    ids = _ids(101, 2, 9)
    a = middle.config.arch
    cache = _BatchKV(torch.zeros(2, dtype=torch.long), (a.num_heads, a.num_kv_heads, a.head_dim))
    with torch.no_grad():
        first = _batch_logits(middle, ids[:, :8], cache)
        step = _batch_logits(middle, ids[:, 8:], cache)
        want = middle(ids)
    torch.testing.assert_close(first, want[:, 7], atol=1e-9, rtol=0)
    torch.testing.assert_close(step, want[:, 8], atol=1e-9, rtol=0)


# --- early exits against the per-token oracle -----------------------------------------------


@torch.no_grad()
def middle_oracle(
    model: RecursiveLM,
    prompt: list[int],
    fill: str,
    thresholds: tuple[float, ...] = (),
    forced: tuple[str, tuple[float, ...]] | None = None,
    gated: bool = False,
) -> tuple[list[int], list[int], list[float]]:
    """One token at a time, K/V as lists: the unique first layers once before loop 0; a
    decode token tries the unique last layers at each depth where it may exit (kept only where
    it does); a prompt position passes them at the last loop, its token sampled there. The
    depths a decode token skips get K/V by ``fill`` (``ride``: it runs them for real). The
    model's exit heads, where it has them, read the unique last layers' output; ``gated``:
    their gate decides early exits instead of the max-prob rule."""
    loops, layers = model.config.loops, model.config.block_layers
    assert model.prefix is not None and model.suffix is not None
    kv = [[[] for _ in range(layers)] for _ in range(loops)]
    filled = [[set() for _ in range(layers)] for _ in range(loops)]
    first = [[[] for _ in range(model.prefix.stack_layers)]]
    last = [[[] for _ in range(model.suffix.stack_layers)]]
    none: list[list[set]] = [[set() for _ in range(4)]]
    tokens, depths, logprobs = list(prompt), [], []
    for pos in range(len(prompt) + MAX_TOKENS - 1):
        decode, needs_logits = pos >= len(prompt), pos >= len(prompt) - 1
        positions = torch.tensor([pos])
        h = model.enter(
            model.embed_tokens(torch.tensor([tokens[pos]])),
            positions,
            ListAttention(first, 0, none),
        )
        sampled = None
        for b in range(loops):
            h = model.block_forward(h, b, positions, ListAttention(kv, b, filled))
            at_last = b == loops - 1
            if sampled is not None or not (at_last or (decode and needs_logits)):
                continue
            out = model.leave(h, positions, ListAttention(last, 0, none))
            if not needs_logits:
                continue  # a prompt position: its suffix K/V, from the last loop
            logits = model.exit_logits(out, b).float()
            if forced is not None:
                stay = b < min(loops - 1, forced_exit_depth(forced[0], pos, forced[1]))
            elif gated and not at_last:
                assert model.exit_heads is not None
                stay = float(model.exit_heads.gate(out, b)) < thresholds[b]
            else:
                stay = not at_last and float(confidence(logits, "prob")) < thresholds[b]
            if stay:
                for entries in last[0]:
                    entries.pop()  # tried, not kept: it leaves later
                continue
            sampled = int(logits.argmax())
            tokens.append(sampled)
            depths.append(b)
            logprobs.append(float(logits.log_softmax(-1)[0, sampled]))
            if fill == "ride" or at_last:
                continue
            for d in range(b + 1, loops):
                for layer in range(layers):
                    if fill == "copy":
                        kv[d][layer].append(kv[b][layer][-1])
                    else:
                        kv[d][layer].append(model.kv_projection(layer, h, d, positions))
            break
    return tokens[len(prompt) :], depths, logprobs


MODES = [
    ("depth", "mixed", "propagate"),
    ("depth", "mixed", "copy"),
    ("depth", "aligned", "propagate"),
    ("sequence", "auto", "ride"),
]


def _assert_equal(got: dict, want: dict) -> None:
    for rid, (tokens, depths, logprobs) in want.items():
        assert (got[rid][0], got[rid][1]) == (tokens, depths), rid
        torch.testing.assert_close(got[rid][2], logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_forced_exits_equal_the_oracle(
    middle: RecursiveLM, batching: str, alignment: str, fill: str
) -> None:
    weights = (1.0, 1.0)
    prompts = _prompts()
    want = {
        rid: middle_oracle(middle, ids, fill, forced=(f"{rid}#0", weights))
        for rid, ids in prompts.items()
    }
    assert {d for _, depths, _ in want.values() for d in depths} == {0, 1}
    got = _run_engine(
        middle,
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        forced_exit_weights=weights,
    )
    _assert_equal(got, want)


@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_confidence_exits_equal_the_oracle(
    middle: RecursiveLM, batching: str, alignment: str, fill: str
) -> None:
    """A threshold near the median depth-0 confidence: candidates that stay wrote suffix K/V
    the engine must rewrite when they leave."""
    ids = torch.tensor([p[:9] for p in _prompts().values() if len(p) >= 9])
    conf = confidence(middle.exit_logits(middle.loop_hidden_states(ids)[0], 0).float(), "prob")
    thresholds = (float(conf.median()),)
    prompts = _prompts()
    want = {rid: middle_oracle(middle, p, fill, thresholds) for rid, p in prompts.items()}
    depths = [d for _, ds, _ in want.values() for d in ds]
    assert 0 < depths.count(0) < len(depths), "tokens must exit at both depths"
    got = _run_engine(
        middle,
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        exit_thresholds=thresholds,
    )
    _assert_equal(got, want)


@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_gated_exits_with_exit_heads_equal_the_oracle(
    middle: RecursiveLM, batching: str, alignment: str, fill: str
) -> None:
    """Random exit heads and gates act on the unique last layers' output, in the engine as in
    the oracle; the heads change tokens (they are not ignored)."""
    model = copy.deepcopy(middle)
    h = model.config.arch.hidden_size
    gen = torch.Generator().manual_seed(5)
    model.exit_heads = ExitHeads(1, h, dtype=torch.float64)
    model.exit_heads.load_state_dict(
        {
            "weight": torch.eye(h, dtype=torch.float64)
            + 0.5 * torch.randn(1, h, h, generator=gen, dtype=torch.float64) / h**0.5,
            "bias": 0.3 * torch.randn(1, h, generator=gen, dtype=torch.float64),
            "gate_weight": torch.randn(1, h, generator=gen, dtype=torch.float64) / h**0.5,
            "gate_bias": torch.zeros(1, dtype=torch.float64),
        }
    )
    model.config = replace(model.config, exit_heads=True)
    ids = torch.tensor([p[:9] for p in _prompts().values() if len(p) >= 9])
    with torch.no_grad():
        score = model.exit_heads.gate(model.loop_hidden_states(ids)[0], 0)
    thresholds = (float(score.median()),)
    prompts = _prompts()
    want = {
        rid: middle_oracle(model, p, fill, thresholds, None, True) for rid, p in prompts.items()
    }
    depths = [d for _, ds, _ in want.values() for d in ds]
    assert 0 < depths.count(0) < len(depths), "tokens must exit at both depths"
    lens = copy.deepcopy(model)  # the same gates, identity maps
    assert lens.exit_heads is not None
    with torch.no_grad():
        lens.exit_heads.weight.copy_(torch.eye(h).expand(1, h, h))
        lens.exit_heads.bias.zero_()
    plain = {
        rid: middle_oracle(lens, p, fill, thresholds, None, True) for rid, p in prompts.items()
    }
    assert any(plain[r][0] != o[0] for r, o in want.items()), "the heads' maps changed nothing"
    got = _run_engine(
        model,
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        exit_thresholds=thresholds,
        exit_measure="gate",
    )
    _assert_equal(got, want)
