"""Prefix caching: shared prompt blocks give the same tokens as recomputing them, in every
batching mode and under eviction and preemption, and every block comes back."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
from server_support import LiveServer, write_tiny_rrt
from transformers import LlamaForCausalLM

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.recursive import RecursiveLM
from scheduler.block_allocator import BlockAllocator
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.prefix_cache import PrefixCache, block_keys
from scheduler.sampling import SamplingParams
from server.settings import ServeSettings

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 8), progress=False
    )
    return model.eval()


def test_keys_chain_and_entries_hold_references() -> None:
    a = block_keys([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3 and a == block_keys([1, 2, 3, 4, 5, 6, 8], 2)
    b = block_keys([9, 2, 3, 4, 5, 6], 2)
    assert not set(a) & set(b)  # a different first block changes every later key
    alloc = BlockAllocator(6)
    cache = PrefixCache(alloc, 2)
    blocks = alloc.allocate(2)
    assert blocks is not None
    cache.insert(a[0], tuple(blocks))
    alloc.free(blocks)  # the request ends; the entry keeps them
    assert alloc.num_used == 2
    assert cache.match(a, 3, 7) == [tuple(blocks)] and cache.hits == 2 and cache.queries == 7
    alloc.free(blocks)  # the second request ends
    assert cache.evict() and alloc.num_used == 0 and not cache.evict()


def _prompts(seed: int, n: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(3, 101) for _ in range(13)]  # 3 full blocks of 4, and a bit
    return {
        f"s{seed}-{i}": system + [rng.randrange(3, 101) for _ in range(i % 5 + 1)] for i in range(n)
    }


def _run_waves(engine: Engine, waves: list[dict[str, list[int]]]) -> tuple[dict, dict]:
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    for wave in waves:
        for rid, ids in wave.items():
            engine.add_request(rid, ids, GREEDY)
            tokens[rid] = []
        while engine.has_work:
            for o in engine.step()[0]:
                tokens[o.request_id] += o.token_ids
                cached[o.request_id] = o.cached_tokens
    return tokens, cached


@pytest.mark.parametrize(
    ("batching", "num_blocks"), [("depth", 512), ("sequence", 512), ("depth", 40)]
)
def test_cached_prefixes_give_the_recomputed_tokens(
    rrt: RecursiveLM, batching: str, num_blocks: int
) -> None:
    """Two waves sharing a system prompt (the second hits what the first cached); 40 blocks
    force evictions and preemptions."""
    waves = [_prompts(1, 6), _prompts(1, 12)]
    waves[1] = {k + "b": v for k, v in waves[1].items()}
    cfg = {"block_size": 4, "max_num_batched_tokens": 64, "max_model_len": 128}
    off = Engine(rrt, EngineConfig(batching=batching, num_blocks=512, **cfg))
    on = Engine(
        rrt,
        EngineConfig(batching=batching, num_blocks=num_blocks, enable_prefix_caching=True, **cfg),
    )
    want, _ = _run_waves(off, waves)
    got, cached = _run_waves(on, waves)
    assert got == want
    cache = on.scheduler.prefix_cache
    assert cache is not None
    if num_blocks == 512:  # the 3 system-prompt blocks at least (a repeated prompt: 4 blocks)
        assert all(cached[rid] in (12, 16) for rid in waves[1]), cached
        assert cache.hits >= 12 * len(waves[1])
    else:  # too small to keep everything: entries were evicted, requests preempted
        assert on.scheduler.num_preemptions > 0 and cache.hits > 0
    assert on.scheduler.allocator.num_used == len(cache) * 3  # only the cache holds blocks
    while cache.evict():
        pass
    assert on.scheduler.allocator.num_used == 0


def test_cached_tokens_in_usage_and_metrics(tmp_path: Path) -> None:
    settings = ServeSettings(
        model=str(write_tiny_rrt(tmp_path)),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=128,
        threads=1,
        enable_prefix_caching=True,
    )
    body = {
        "prompt": "the cat and the dog were on the moon with the sun",  # 12 words: 3 blocks
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
    }
    with LiveServer(settings) as live:
        first, second = (
            httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json() for _ in range(2)
        )
        text = httpx.get(f"{live.url}/metrics").text
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}  # the last is run
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    hits = [ln for ln in text.splitlines() if ln.startswith("loopserve:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) == 8


def test_n_samples_share_their_prompt(rrt: RecursiveLM) -> None:
    """Samples 1..n-1 wait for sample 0's prefill, then start on its cached blocks; seeded
    draws make each sample's tokens the same as without caching."""
    prompts = {"a": list(range(3, 21)), "b": list(range(40, 51))}  # 4 and 2 full blocks
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=7, n=4, ignore_eos=True)
    cfg = {"block_size": 4, "num_blocks": 512, "max_model_len": 128}
    want = Engine(rrt, EngineConfig(**cfg)).generate(prompts, params)
    on = Engine(rrt, EngineConfig(enable_prefix_caching=True, **cfg))
    cached: dict[tuple[str, int], int] = {}
    for rid, ids in prompts.items():
        on.add_request(rid, ids, params)
    assert on.scheduler.num_waiting == 8 and len(on.scheduler.waiting) == 2
    got: dict[str, list[list[int]]] = {rid: [[] for _ in range(4)] for rid in prompts}
    while on.has_work:
        for o in on.step()[0]:
            got[o.request_id][o.index] += o.token_ids
            cached[o.request_id, o.index] = o.cached_tokens
    assert got == want
    assert [cached["a", i] for i in range(4)] == [0, 16, 16, 16]
    assert [cached["b", i] for i in range(4)] == [0, 8, 8, 8]
