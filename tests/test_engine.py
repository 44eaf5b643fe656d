"""The engine against the cache-free full forward, across batching modes and schedules."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.generate import greedy_generate
from model.recursive import RecursiveLM
from model.serving import materialise_high_rank
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from scheduler.scheduler import RequestRejected

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    """3 loops x 2 block layers, rank-8 deltas: every per-depth path differs."""
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False
    )
    return model.eval()


@pytest.fixture(scope="module")
def dense_rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    """The same conversion served as dense per-depth weights (as high-rank models are)."""
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False
    )
    assert len(materialise_high_rank(model, force=True)) == len(LINEAR_MODULES)
    return model.eval()


def _prompts(n: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [rng.randrange(3, 101) for _ in range(rng.randint(1, 40))] for i in range(n)}


def _reference(model: RecursiveLM, prompts: dict[str, list[int]], n: int, loops: int | None = None):
    return {rid: greedy_generate(model, ids, n, num_loops=loops) for rid, ids in prompts.items()}


def _engine(model: RecursiveLM, **kw: object) -> Engine:
    cfg = {"block_size": 4, "num_blocks": 512, "max_num_batched_tokens": 64, "max_model_len": 128}
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def _run(engine: Engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict:
    return {rid: outs[0] for rid, outs in engine.generate(prompts, params).items()}


MODES = [("depth", "mixed"), ("depth", "aligned"), ("sequence", "auto")]


@pytest.mark.parametrize(("batching", "alignment"), MODES)
def test_greedy_matches_full_forward_exits_off(
    rrt: RecursiveLM, batching: str, alignment: str
) -> None:
    prompts = _prompts(16)
    want = _reference(rrt, prompts, GREEDY.max_tokens)
    mode = {"batching": batching, "depth_alignment": alignment}
    got = _run(_engine(rrt, **mode), prompts, GREEDY)
    assert got == want
    one_at_a_time = {
        rid: _run(_engine(rrt, **mode), {rid: ids}, GREEDY)[rid]
        for rid, ids in list(prompts.items())[:4]
    }
    assert one_at_a_time == {rid: want[rid] for rid in one_at_a_time}


def test_paged_logprobs_match_full_forward(rrt: RecursiveLM) -> None:
    prompts = _prompts(5, seed=3)
    params = replace(GREEDY, logprobs=5, max_tokens=4)
    engine = _engine(rrt)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    samples: dict[str, list] = {rid: [] for rid in prompts}
    while engine.has_work:
        for o in engine.step()[0]:
            samples[o.request_id].extend(o.samples)
    for rid, ids in prompts.items():
        tokens = [s.token for s in samples[rid]]
        full = rrt(torch.tensor([ids + tokens]))[0].log_softmax(-1)
        for j, s in enumerate(samples[rid]):
            row = full[len(ids) - 1 + j]
            top_ids = [t for t, _ in s.top_logprobs]
            got = torch.tensor([lp for _, lp in s.top_logprobs])
            torch.testing.assert_close(got, row[top_ids], atol=1e-4, rtol=0)
            assert top_ids == row.topk(5).indices.tolist()


@pytest.mark.parametrize("min_loops", [1, 2])
def test_min_loops_with_zero_threshold_is_truncated_model(rrt: RecursiveLM, min_loops: int) -> None:
    """Every token leaves at loop min_loops: later tokens never read the filled depths, so the
    fill policy cannot show here (tests/test_exit_oracle.py checks fills that are read)."""
    prompts = _prompts(6, seed=5)
    engine = _engine(rrt, exit_threshold=0.0, min_loops=min_loops)
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, GREEDY)
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    fills = [0, 0, 0]
    while engine.has_work:
        outputs, stats = engine.step()
        fills = [a + b for a, b in zip(fills, stats.fills_per_depth, strict=True)]
        for o in outputs:
            assert o.exit_depths == [min_loops - 1]
            got[o.request_id].extend(o.token_ids)
    assert got == _reference(rrt, prompts, GREEDY.max_tokens, loops=min_loops)
    # decode tokens skip loops >= min_loops and get them filled; the first token of each
    # request comes from its prefill, which runs every loop for real
    expected_fills = len(prompts) * (GREEDY.max_tokens - 1)
    assert fills == [0 if d < min_loops else expected_fills for d in range(3)]


def _slot(table: list[int], pos: int, block_size: int) -> int:
    """Flat KV slot of position ``pos`` under a block table (the paged layout's definition)."""
    return table[pos // block_size] * block_size + pos % block_size


def test_copy_fill_writes_exit_depth_kv(rrt: RecursiveLM) -> None:
    engine = _engine(rrt, exit_threshold=0.0, min_loops=1, kv_fill="copy")
    engine.add_request("a", [5, 6, 7], replace(GREEDY, max_tokens=50))
    for _ in range(12):
        engine.step()
    req = engine.scheduler.requests["a#0"]
    cache = engine.runner.cache
    generated = range(3, req.num_computed)
    assert len(generated) >= 5
    for layer in range(rrt.config.block_layers):
        for d in (1, 2):
            for p in generated:
                src = _slot(req.block_tables[0], p, cache.block_size)
                dst = _slot(req.block_tables[d], p, cache.block_size)
                k = cache.k[layer].view(-1, *cache.k[layer].shape[2:])
                assert torch.equal(k[src], k[dst])
    engine.abort("a")
    assert engine.scheduler.allocator.num_used == 0


def test_propagate_fill_is_kv_projection_of_exit_state(rrt: RecursiveLM) -> None:
    """Depth-1 exit: the K written at depth 2 for that token equals the model's K/V
    projection of its exit hidden state, which the 2-loop truncated forward reproduces."""
    engine = _engine(rrt, exit_threshold=0.0, min_loops=2, kv_fill="propagate")
    prompt = [9, 8, 7, 6]
    engine.add_request("a", prompt, replace(GREEDY, max_tokens=50))
    for _ in range(8):
        engine.step()
    req = engine.scheduler.requests["a#0"]
    pos = len(prompt)  # the first generated token, exited at depth 1
    ids = torch.tensor([req.token_ids(0, pos + 1)])
    exit_hidden = rrt.loop_hidden_states(ids, num_loops=2)[-1][0, pos : pos + 1]
    cache = engine.runner.cache
    for layer in range(rrt.config.block_layers):
        want_k, want_v = rrt.kv_projection(layer, exit_hidden, 2, torch.tensor([pos]))
        slot = _slot(req.block_tables[2], pos, cache.block_size)
        k = cache.k[layer].view(-1, *cache.k[layer].shape[2:])[slot]
        v = cache.v[layer].view(-1, *cache.v[layer].shape[2:])[slot]
        torch.testing.assert_close(k, want_k[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, want_v[0], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_ignores_batch_composition(rrt: RecursiveLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    prompts = _prompts(6, seed=9)
    alone = _run(_engine(rrt), {"r0": prompts["r0"]}, params)["r0"]
    crowd = _run(_engine(rrt, max_num_batched_tokens=32), prompts, params)["r0"]
    assert alone == crowd
    other_seed = _run(_engine(rrt), {"r0": prompts["r0"]}, replace(params, seed=99))["r0"]
    assert other_seed != alone


def test_n_samples_use_distinct_seeds(rrt: RecursiveLM) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    out = _engine(rrt).generate({"x": [4, 5, 6]}, params)["x"]
    assert len(out) == 3 and all(len(o) == 8 for o in out)
    assert len({tuple(o) for o in out}) == 3
    single = _engine(rrt).generate({"x": [4, 5, 6]}, replace(params, n=1, seed=8))["x"][0]
    assert single == out[1]


PIECES = tuple(f"{chr(97 + i % 26)}{'' if i % 3 else chr(65 + i % 26)}" for i in range(101))


class CharTokenizer:
    """Token i decodes to a fixed 1-2 character string: stops can span token boundaries."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in ids)


def test_stop_string_across_token_boundary(rrt: RecursiveLM) -> None:
    prompt = [11, 12, 13]
    free = greedy_generate(rrt, prompt, 8)
    text = CharTokenizer().decode(free)
    assert len(free) == 8
    # a stop string made of the end of token 2 and the start of token 3
    t2, t3 = PIECES[free[2]], PIECES[free[3]]
    stop = t2[-1] + t3[0]
    cut = text.find(stop)
    engine = Engine(rrt, EngineConfig(block_size=4, num_blocks=64), tokenizer=CharTokenizer())
    engine.add_request("s", prompt, SamplingParams(max_tokens=8, temperature=0, stop=(stop,)))
    pieces, reasons = [], []
    while engine.has_work:
        for o in engine.step()[0]:
            pieces.append(o.text)
            reasons.append(o.finish_reason)
    assert "".join(pieces) == text[:cut]
    assert reasons[-1] == "stop" and reasons.count("stop") == 1
    assert engine.scheduler.allocator.num_used == 0


def test_stop_strings_wait_for_min_tokens(rrt: RecursiveLM) -> None:
    """A stop string made by the first two tokens is passed over while ``min_tokens`` holds
    (vLLM's rule); the text then stops at the next one."""
    prompt = [11, 12, 13]
    free = greedy_generate(rrt, prompt, 8)
    text = CharTokenizer().decode(free)
    stop = PIECES[free[0]] + PIECES[free[1]]
    engine = Engine(rrt, EngineConfig(block_size=4, num_blocks=64), tokenizer=CharTokenizer())
    for rid, low in (("now", 0), ("held", 3)):
        params = SamplingParams(max_tokens=8, temperature=0, stop=(stop,), min_tokens=low)
        engine.add_request(rid, prompt, params)
    texts: dict[str, str] = {"now": "", "held": ""}
    while engine.has_work:
        for o in engine.step()[0]:
            texts[o.request_id] += o.text
    assert texts["now"] == ""
    # the first stop string that ends past the first two tokens' text (it may begin in it)
    seen = len(PIECES[free[0]] + PIECES[free[1]])
    later = text.find(stop, seen - len(stop) + 1)
    assert later > 0 and texts["held"] == text[:later]


def test_rejects_requests_that_can_never_fit(rrt: RecursiveLM) -> None:
    engine = _engine(rrt, num_blocks=12, max_model_len=64)
    with pytest.raises(RequestRejected, match="maximum context length is 64"):
        engine.add_request("long", list(range(3, 67)), GREEDY)
    with pytest.raises(RequestRejected, match="KV blocks"):
        engine.add_request("big", list(range(3, 20)), replace(GREEDY, max_tokens=40))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("empty", [], GREEDY)
    assert not engine.has_work and engine.scheduler.allocator.num_used == 0


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lens=st.lists(st.integers(1, 24), min_size=1, max_size=8),
    max_tokens=st.lists(st.integers(1, 6), min_size=8, max_size=8),
    arrivals=st.lists(st.integers(0, 6), min_size=8, max_size=8),
    aborts=st.lists(st.integers(0, 12), min_size=8, max_size=8),
    num_blocks=st.integers(30, 60),
    budget=st.integers(4, 40),
    mode=st.sampled_from(MODES),
)
def test_random_schedules_end_cleanly(
    rrt: RecursiveLM,
    lens: list[int],
    max_tokens: list[int],
    arrivals: list[int],
    aborts: list[int],
    num_blocks: int,
    budget: int,
    mode: tuple[str, str],
) -> None:
    """Random arrivals/lengths/aborts on a small pool: every request ends, nothing leaks,
    budgets hold, and requests that were preempted still give the unpreempted output."""
    rng = random.Random(sum(lens))
    prompts = {f"q{i}": [rng.randrange(3, 101) for _ in range(n)] for i, n in enumerate(lens)}
    batching, alignment = mode
    cfg = EngineConfig(
        batching=batching,
        depth_alignment=alignment,
        block_size=4,
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=4,
        max_model_len=64,
    )
    engine = Engine(rrt, cfg)
    pending = dict(prompts)
    abort_at = {rid: aborts[i] for i, rid in enumerate(prompts) if aborts[i] < 4}
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    finished: set[str] = set()
    aborted: set[str] = set()
    step = 0
    while pending or engine.has_work:
        for i, rid in enumerate(list(prompts)):
            if rid in pending and arrivals[i] <= step:
                engine.add_request(rid, pending.pop(rid), replace(GREEDY, max_tokens=max_tokens[i]))
        for rid, when in abort_at.items():
            if when == step and rid not in finished and rid not in pending:
                engine.abort(rid)
                aborted.add(rid)
        outputs, stats = engine.step()
        _assert_rows_mirror_scheduler(engine)
        assert sum(stats.rows_per_depth) <= budget * max(1, len(stats.depths_per_pass))  # a pass
        assert stats.num_running <= 4
        for o in outputs:
            got[o.request_id].extend(o.token_ids)
            if o.finished:
                finished.add(o.request_id)
        step += 1
        assert step < 2000, "engine did not drain"
    assert finished | aborted == set(prompts)
    assert engine.scheduler.allocator.num_used == 0 and not engine.scheduler.requests
    assert not engine.runner.hidden
    engine.runner.rows.update(engine.scheduler.schedule().dropped, [], [])  # the last drops
    assert not engine.runner.rows.slot
    for i, rid in enumerate(prompts):
        if rid not in aborted:
            assert got[rid] == greedy_generate(rrt, prompts[rid], max_tokens[i]), rid


def _assert_rows_mirror_scheduler(engine: Engine) -> None:
    """The runner's persistent row state, built only from each step's changes, holds every
    running request's block tables and settings exactly as the scheduler has them."""
    rows = engine.runner.rows
    for req in engine.scheduler.running:
        s = rows.slot[req.request_id]
        for d, table in enumerate(req.block_tables):
            assert rows.tables[s, d, : len(table)].tolist() == table, (req.request_id, d)
        assert rows.requests[req.request_id].params is req.params
    live = {r.request_id for r in engine.scheduler.running}
    assert set(rows.slot) <= live | set(engine.scheduler._dropped)


def _staggered_run(model: RecursiveLM, alignment: str) -> tuple[dict, list[int], list[int]]:
    """Requests arriving one step apart; per step, the most depths one of its block passes ran
    and the longest hold."""
    prompts = _prompts(6, seed=5)
    engine = _engine(model, depth_alignment=alignment, max_num_batched_tokens=256)
    params = replace(GREEDY, max_tokens=10)
    pending = list(prompts.items())
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    depths_per_step, longest_hold = [], []
    while pending or engine.has_work:
        if pending:
            engine.add_request(*pending.pop(0), params)
        outputs, stats = engine.step()
        depths_per_step.append(max(stats.depths_per_pass, default=0))
        held = [r.item.held for r in engine.scheduler.running if r.item is not None]
        longest_hold.append(max(held, default=0))
        for o in outputs:
            got[o.request_id].extend(o.token_ids)
    assert got == _reference(model, prompts, params.max_tokens)
    return got, depths_per_step, longest_hold


def test_aligned_schedule_runs_one_depth_per_step_and_holds_briefly(
    dense_rrt: RecursiveLM,
) -> None:
    """Staggered arrivals put rows at every depth; mixed steps run up to three depths (three
    full weight reads for dense per-depth weights), aligned steps fall into one depth."""
    _, mixed, _ = _staggered_run(dense_rrt, "mixed")
    _, aligned, holds = _staggered_run(dense_rrt, "aligned")
    assert max(mixed) == 3
    assert max(holds) <= 2  # loops - 1: nothing waits longer
    assert sum(d > 1 for d in aligned) <= 2  # only where a held row is forced in
    assert sum(aligned) < sum(mixed)


def _passes_per_step(model: RecursiveLM, params: dict[str, SamplingParams], **kw: object):
    """Every request added at once; the block passes of each step, and the tokens."""
    engine = _engine(model, max_num_batched_tokens=256, **kw)
    prompts = _prompts(len(params), seed=9)
    for rid, p in zip(prompts, params.values(), strict=True):
        engine.add_request(rid, prompts[rid], p)
    passes, got = [], {rid: [] for rid in prompts}
    while engine.has_work:
        outputs, stats = engine.step()
        passes.append(len(stats.depths_per_pass))
        for o in outputs:
            got[o.request_id].extend(o.token_ids)
    return passes, got, prompts


def test_aligned_steps_no_item_can_leave_run_every_loop_in_one_step(
    dense_rrt: RecursiveLM,
) -> None:
    """Aligned, every item at loop 0 and no exit possible: a step runs all three loops, as many
    steps as sequence-wise batching takes, the same tokens as the cache-free reference. One
    request that may exit (its own threshold, or a forced schedule) makes every loop its own
    step again, so that exits free their rows at once."""
    off = {f"r{i}": GREEDY for i in range(4)}
    passes, got, prompts = _passes_per_step(dense_rrt, off, depth_alignment="aligned")
    assert set(passes) == {3}
    assert got == _reference(dense_rrt, prompts, GREEDY.max_tokens)
    sequence, _, _ = _passes_per_step(dense_rrt, off, batching="sequence")
    assert len(passes) == len(sequence)
    one_may_exit = {**off, "r3": replace(GREEDY, exit_threshold=0.5)}
    passes, _, _ = _passes_per_step(dense_rrt, one_may_exit, depth_alignment="aligned")
    assert set(passes) == {1}
    forced, _, _ = _passes_per_step(
        dense_rrt, off, depth_alignment="aligned", forced_exit_weights=(0.0, 0.0, 1.0)
    )
    assert set(forced) == {1}
    mixed, _, _ = _passes_per_step(dense_rrt, off, depth_alignment="mixed")
    assert set(mixed) == {1}  # mixed depths: a newcomer joins at any loop


def test_auto_alignment_follows_the_weight_layout(rrt: RecursiveLM, dense_rrt: RecursiveLM) -> None:
    assert not _engine(rrt).scheduler.aligned  # shared weights + rank-8 deltas: mix depths
    assert _engine(dense_rrt).scheduler.aligned  # dense per-depth weights: align
    assert not _engine(dense_rrt, depth_alignment="mixed").scheduler.aligned
    assert not _engine(dense_rrt, batching="sequence").scheduler.aligned
    with pytest.raises(ValueError, match="depth_alignment"):
        EngineConfig(depth_alignment="sometimes")


@pytest.mark.parametrize("batching", ["depth", "sequence"])
def test_preempted_requests_recompute_to_the_same_output(rrt: RecursiveLM, batching: str) -> None:
    prompts = _prompts(6, seed=11)
    params = replace(GREEDY, max_tokens=12)
    engine = _engine(rrt, batching=batching, num_blocks=60, max_num_batched_tokens=64)
    got = _run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert got == _reference(rrt, prompts, params.max_tokens)
    assert engine.scheduler.allocator.num_used == 0


def test_per_depth_thresholds_and_request_override(rrt: RecursiveLM) -> None:
    """Calibrated per-depth thresholds: depth 0 never (2.0), depth 1 always (0.0) — every
    token leaves after two loops; a request's own threshold replaces them at every depth."""
    prompts = _prompts(4, seed=13)
    engine = _engine(rrt, exit_thresholds=(2.0, 0.0))
    depths: list[int] = []
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, GREEDY)
    while engine.has_work:
        for o in engine.step()[0]:
            got[o.request_id].extend(o.token_ids)
            depths.extend(o.exit_depths)
    assert set(depths) == {1}
    assert got == _reference(rrt, prompts, GREEDY.max_tokens, loops=2)
    override = replace(GREEDY, exit_threshold=0.0)
    out = _engine(rrt, exit_thresholds=(2.0, 0.0)).generate({"a": prompts["r0"]}, override)
    assert out["a"][0] == greedy_generate(rrt, prompts["r0"], GREEDY.max_tokens, num_loops=1)
    assert EngineConfig(exit_thresholds=(0.5,)).thresholds_for(3) == (0.5, 2.0, 2.0)
    assert EngineConfig(exit_threshold=0.7).thresholds_for(2) == (0.7, 0.7)


def test_abort_frees_in_flight_hidden_rows_at_once(rrt: RecursiveLM) -> None:
    """Defect: an aborted request's stashed hidden rows stayed resident until the next step,
    and an idle engine never takes one."""
    engine = _engine(rrt)
    engine.add_request("a", [5, 6, 7, 8], replace(GREEDY, max_tokens=20))
    engine.step()  # the prefill ran loop 0 and waits at depth 1 with its hidden rows
    assert set(engine.runner.hidden) == {"a#0"}
    engine.abort("a")
    assert engine.runner.hidden == {} and not engine.runner.rows.slot and not engine.has_work
    assert engine.scheduler.allocator.num_used == 0
