"""The compiled block pass (``model.compiled_block``) against the eager pass it replaces.

Inductor compiles each piece once per bucket and the graphs are shared by every pass over the
same model, so the tests keep to one tiny model and two buckets. A machine where inductor
cannot compile (no C++ compiler) fails here: torch.compile raises, and each test checks that
graphs were compiled, not run eager.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from transformers import LlamaForCausalLM

from loopserve.cli import build_parser
from loopserve_kernels import dense_per_depth_linear, fuse_lora, fused_lora_linear, lora_linear
from model import compiled_block
from model.attention import CausalAttention
from model.checkpoint import load_model
from model.compiled_block import CompiledBlockPass, row_buckets
from model.config import LINEAR_MODULES
from model.convert import convert
from model.recursive import RecursiveLM
from model.serving import materialise_high_rank, prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.exit_policy import EXITS_OFF
from scheduler.sampling import SamplingParams
from server.loader import engine_config
from server.settings import ServeSettings

BUCKETS = (4, 16)
BUDGET = 16  # a step's rows: never above the largest bucket, so every pass runs compiled
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    """3 loops x 2 block layers, rank-8 deltas: every per-depth path differs."""
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False
    )
    return model.eval()


def _graphs() -> int:
    """Graphs compiled for the pass's pieces in this process (each with its own guards)."""
    return len(_debug_get_cache_entry_list(compiled_block._piece.__code__))


def _one_graph_per_piece_and_bucket(model: RecursiveLM, every_bucket: bool = True) -> None:
    """Each piece (K + 1) compiled once per bucket it ran at (``every_bucket``: at all of
    them): not run eager, not recompiled per call."""
    most = (model.config.block_layers + 1) * len(BUCKETS)
    assert (_graphs() == most) if every_bucket else (0 < _graphs() <= most)


def test_row_buckets_ladder_then_strides() -> None:
    assert row_buckets(1) == (1,)
    assert row_buckets(3) == (1, 2, 4)
    assert row_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert row_buckets(600) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768)
    with pytest.raises(ValueError, match="ascending"):
        CompiledBlockPass(RecursiveLM.__new__(RecursiveLM), (8, 4))
    with pytest.raises(ValueError, match="compile_buckets"):
        EngineConfig(compile_block=True, compile_buckets=(4, 4))


@torch.inference_mode()
def test_pass_matches_eager_at_mixed_depths_and_padded_rows(rrt: RecursiveLM) -> None:
    """5 and 11 rows (padded to 16) at mixed depths, 3 rows (padded to 4) at one depth, as a
    depth tensor and as an int: the eager pass's hidden states."""
    compiled = CompiledBlockPass(rrt, BUCKETS)
    gen = torch.Generator().manual_seed(0)
    for lens, depths in (([3, 2], [0, 2]), ([4, 1, 6], [0, 1, 2]), ([3], [1])):
        n = sum(lens)
        hidden = torch.randn(n, rrt.config.arch.hidden_size, generator=gen)
        positions = torch.cat([torch.arange(s) for s in lens])
        per_row = torch.cat([torch.full((s,), d) for s, d in zip(lens, depths, strict=True)])
        for depth in (per_row, depths[0]) if len(set(depths)) == 1 else (per_row,):
            want = rrt.block_forward(hidden, depth, positions, CausalAttention(lens))
            got = compiled(hidden, depth, positions, CausalAttention(lens))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n = BUCKETS[-1] + 1  # above the largest bucket: the eager pass itself, nothing compiled
    hidden = torch.randn(n, rrt.config.arch.hidden_size, generator=gen)
    positions, depth = torch.arange(n), torch.full((n,), 1)
    want = rrt.block_forward(hidden, depth, positions, CausalAttention([n]))
    assert torch.equal(compiled(hidden, depth, positions, CausalAttention([n])), want)
    _one_graph_per_piece_and_bucket(rrt)


def test_twins_trace_as_masked_depths() -> None:
    """Under torch.compile the per-depth twins mask each depth's result (static shapes) instead
    of gathering rows: the eager twins' outputs, an out-of-range depth included (no delta; zeros
    for dense weights). Traced by dynamo alone (``backend="eager"``), no inductor compile."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=gen)
    w = torch.randn(10, 12, generator=gen)
    a = torch.randn(3, 4, 12, generator=gen)
    b = torch.randn(3, 10, 4, generator=gen)
    dense = torch.randn(3, 10, 12, generator=gen)
    depth = torch.tensor([0, 0, 2, 1, 1, 2, 3])
    fused = fuse_lora([a[:, :2], a[:, 2:]], [b[:, :6, :2], b[:, 6:, 2:]])
    calls = [
        lambda x, d: lora_linear(x, w, a, b, d),
        lambda x, d: fused_lora_linear(x, w, fused, d),
        lambda x, d: dense_per_depth_linear(x, dense, d),
    ]
    for call in calls:
        traced = torch.compile(call, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(traced(x, depth), call(x, depth), rtol=1e-6, atol=1e-6)


def test_serve_compile_reaches_the_engine_with_traceable_weights(
    tiny_hf: tuple[Path, LlamaForCausalLM],
) -> None:
    """``serve --compile`` sets ``compile_block`` (off by default), and the serving transforms
    then leave out the packed CPU weights the compiled pass refuses."""
    parser, _ = build_parser(["serve"])
    assert parser.parse_args(["serve", "--compile"]).compile is True
    assert not hasattr(parser.parse_args(["serve"]), "compile")  # unset: the settings' default
    model = load_model(tiny_hf[0])
    on = ServeSettings(kv_cache_memory="1MiB", block_size=4, compile=True)
    assert engine_config(model, on, model.dtype).compile_block
    off = ServeSettings(kv_cache_memory="1MiB", block_size=4)
    assert not engine_config(model, off, model.dtype).compile_block
    plan = prepare_for_serving(model, compiled=True)
    assert plan.packed == [] and model.decode_layer is None
    CompiledBlockPass(model, BUCKETS)  # accepted (compiles on first call)
    packed = load_model(tiny_hf[0])
    if prepare_for_serving(packed).packed:  # where this CPU packs weights at all
        with pytest.raises(ValueError, match="packed"):
            CompiledBlockPass(packed, BUCKETS)


def _engine(model: RecursiveLM, compiled: bool, **kw: object) -> Engine:
    cfg: dict[str, object] = {
        "block_size": 4,
        "num_blocks": 96,
        "max_num_batched_tokens": BUDGET,
        "max_model_len": 64,
        "compile_block": compiled,
        "compile_buckets": BUCKETS,
    }
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))  # type: ignore[arg-type]


def _snapshot(engine: Engine) -> list[torch.Tensor]:
    """Per block layer, every flat slot's K and V side by side: [slots, 2 · kv_heads · D]."""
    cache = engine.runner.cache
    return [
        torch.cat([k.flatten(2), v.flatten(2)], dim=2).flatten(0, 1).clone()
        for k, v in zip(cache.k, cache.v, strict=True)
    ]


def _written(now: list[torch.Tensor], old: list[torch.Tensor]) -> list[frozenset[int]]:
    """Per block layer, the slots whose K or V changed from ``old`` to ``now``."""
    return [
        frozenset((n != o).any(1).nonzero().squeeze(1).tolist())
        for n, o in zip(now, old, strict=True)
    ]


def _lockstep(model: RecursiveLM, buckets: tuple[int, ...], **mode: object) -> int:
    """An eager and a compiled engine stepped side by side, prompts arriving two a step (new
    prompts at loop 0 beside older rows): per step the same tokens, logprobs within float32
    rounding, and the same K/V slots written with the same values — padded rows write none.
    Returns how many passes ran rows at two or more depths."""
    rng = random.Random(1)
    lens = (9, 5, 13, 3, 7, 11)
    prompts = {f"r{i}": [rng.randrange(3, 101) for _ in range(n)] for i, n in enumerate(lens)}
    arrivals = list(prompts.items())
    eager = _engine(model, False, compile_buckets=buckets, **mode)
    compiled = _engine(model, True, compile_buckets=buckets, **mode)
    assert isinstance(compiled.runner.block_pass, CompiledBlockPass)
    mixed_passes, tokens = 0, 0
    while arrivals or eager.has_work:
        for rid, ids in arrivals[:2]:
            for engine in (eager, compiled):
                engine.add_request(rid, ids, GREEDY)
        del arrivals[:2]
        old = [_snapshot(e) for e in (eager, compiled)]
        (want, want_stats), (got, got_stats) = eager.step(), compiled.step()
        assert got_stats.depths_per_pass == want_stats.depths_per_pass
        mixed_passes += sum(d >= 2 for d in want_stats.depths_per_pass)
        assert [(o.request_id, o.token_ids) for o in got] == [
            (o.request_id, o.token_ids) for o in want
        ]
        for g, w in zip(got, want, strict=True):
            tokens += len(w.token_ids)
            torch.testing.assert_close(
                [s.logprob for s in g.samples], [s.logprob for s in w.samples], rtol=0, atol=1e-4
            )
        now = [_snapshot(e) for e in (eager, compiled)]
        slots = [_written(n, o) for n, o in zip(now, old, strict=True)]
        assert slots[1] == slots[0]  # no slot beyond the eager step's
        for layer, written in enumerate(slots[0]):
            at = torch.tensor(sorted(written), dtype=torch.int64)
            torch.testing.assert_close(now[1][layer][at], now[0][layer][at], rtol=1e-5, atol=1e-5)
    assert not compiled.has_work
    assert tokens == len(prompts) * GREEDY.max_tokens
    return mixed_passes


@pytest.mark.parametrize(
    ("batching", "alignment", "threshold"),
    [("depth", "mixed", EXITS_OFF), ("depth", "mixed", 0.0), ("sequence", "auto", EXITS_OFF)],
)
def test_engine_matches_eager_step_by_step(
    rrt: RecursiveLM, batching: str, alignment: str, threshold: float
) -> None:
    """Prefill and decode, depth-wise at mixed depths (threshold 0: every token exits after its
    first loop, so K/V fills run too) and sequence-wise: ``_lockstep``."""
    mode = {"batching": batching, "depth_alignment": alignment, "exit_threshold": threshold}
    mixed_passes = _lockstep(rrt, BUCKETS, **mode)
    if batching == "depth":
        assert mixed_passes > 0, "no pass ran rows at two depths"
    _one_graph_per_piece_and_bucket(rrt, every_bucket=False)


def test_dense_per_depth_weights_keep_an_int_depth(rrt: RecursiveLM) -> None:
    """Per-depth dense weights (as the exact default serves): a pass at one depth keeps its
    int depth, one graph per depth (aligned steps, the default for such models), and matches
    the eager engine as ``_lockstep`` checks. One bucket, to bound the compiles."""
    dense = copy.deepcopy(rrt)
    assert len(materialise_high_rank(dense, force=True)) == len(LINEAR_MODULES)
    before = _graphs()
    assert _lockstep(dense, (BUDGET,), depth_alignment="aligned") == 0
    pieces = dense.config.block_layers + 1
    # each piece once per depth (a depth tensor would be one graph for all three)
    assert _graphs() - before == pieces * dense.config.loops
