"""Paged KV write and paged attention: Triton kernels and torch twins vs float64 goldens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from loopserve_kernels import use_backend
from loopserve_kernels.cpu_kernels import write_kv_cpu
from loopserve_kernels.paged_attention import (
    paged_attention,
    paged_attention_cpu,
    paged_attention_ref,
    write_kv,
    write_kv_ref,
)
from loopserve_kernels.paged_metadata import PagedAttentionMetadata
from loopserve_kernels.testing import (
    assert_close_verbose,
    check_device,
    fp32_bound,
    lowp_bound,
    triton_kernels,
)

DEVICE = check_device()
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def tri() -> Iterator[ModuleType]:
    with triton_kernels("loopserve_kernels.paged_attention_triton") as (module,):
        yield module


@dataclass
class Paged:
    """A batch in logical form (per-sequence K/V) and in paged form (cache + metadata)."""

    q: torch.Tensor  # [T, Hq, D]
    keys: list[torch.Tensor]  # per sequence [ctx, Hkv, D]
    values: list[torch.Tensor]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: PagedAttentionMetadata
    slots: torch.Tensor  # [Σ ctx] flat slot of every cached token, in sequence order


def make_paged(
    seqs: list[tuple[int, int]],
    block_size: int,
    heads: tuple[int, int],
    dim: int,
    dtype: torch.dtype,
    seed: int,
) -> Paged:
    """Sequences ``(q_len, ctx)`` on shuffled physical blocks; unused slots hold NaN poison."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    blocks_per = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_per) + 2
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seqs), max(blocks_per)), num_blocks - 1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per):
        tables[s, :n] = perm[used : used + n].int()
        used += n
    poison = (num_blocks, block_size, hkv, dim)
    k_cache = torch.full(poison, float("nan"), dtype=dtype)
    v_cache = torch.full(poison, float("nan"), dtype=dtype)
    keys = [torch.randn(ctx, hkv, dim, generator=g).to(dtype) for _, ctx in seqs]
    values = [torch.randn(ctx, hkv, dim, generator=g).to(dtype) for _, ctx in seqs]
    slots = torch.cat(
        [
            tables[s, torch.arange(ctx) // block_size].long() * block_size
            + torch.arange(ctx) % block_size
            for s, (_, ctx) in enumerate(seqs)
        ]
    )
    write_kv_ref(torch.cat(keys), torch.cat(values), k_cache, v_cache, slots)
    q_lens = torch.tensor([q for q, _ in seqs])
    meta = PagedAttentionMetadata(
        block_tables=tables.to(DEVICE),
        context_lens=torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int().to(DEVICE),
        max_query_len=int(q_lens.max()),
        max_context_len=max(c for _, c in seqs),
    )
    q = torch.randn(int(q_lens.sum()), hq, dim, generator=g).to(DEVICE, dtype)
    to_dev = [[t.to(DEVICE) for t in ts] for ts in (keys, values)]
    return Paged(q, *to_dev, k_cache.to(DEVICE), v_cache.to(DEVICE), meta, slots.to(DEVICE))


def naive_attention(p: Paged, scale: float) -> torch.Tensor:
    """Float64 softmax attention row by row on the logical (unpaged) K/V, within each
    sequence's sliding window when the metadata has them."""
    out = torch.zeros(p.q.shape, dtype=torch.float64, device=DEVICE)
    qsl = p.meta.query_start_loc.tolist()
    w = p.meta.sliding_windows
    windows = [0] * len(p.keys) if w is None else w.tolist()
    group = p.q.shape[1] // p.keys[0].shape[1]
    for s, (k, v) in enumerate(zip(p.keys, p.values, strict=True)):
        q_len, ctx = qsl[s + 1] - qsl[s], k.shape[0]
        for j in range(q_len):
            for h in range(p.q.shape[1]):
                visible = ctx - q_len + j + 1
                first = max(0, visible - windows[s]) if windows[s] else 0
                kh = k[first:visible, h // group].double()
                vh = v[first:visible, h // group].double()
                w = torch.softmax(kh @ p.q[qsl[s] + j, h].double() * scale, dim=0)
                out[qsl[s] + j, h] = w @ vh
    return out


def f64_cache(p: Paged) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return p.q.double(), p.k_cache.double(), p.v_cache.double()


DECODE = [(1, 1), (1, 17), (1, 40), (1, 130)]
MIXED = [(7, 7), (5, 40), (1, 33), (0, 9), (33, 33), (2, 70)]
CASES = {
    "decode": (DECODE, 16, (6, 2), 32),
    "mixed_bs8": (MIXED, 8, (6, 2), 32),
    "mixed_mha_d48": (MIXED, 16, (2, 2), 48),
    "prefill_gqa4": ([(19, 19), (12, 50)], 32, (8, 2), 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_attention_fp32(tri: ModuleType, case: str, splits: int) -> None:
    seqs, block_size, heads, dim = CASES[case]
    p = make_paged(seqs, block_size, heads, dim, torch.float32, seed=len(case) + splits)
    scale = dim**-0.5
    golden = paged_attention_ref(*f64_cache(p), p.meta, scale)
    out = tri.paged_attention_triton(p.q, p.k_cache, p.v_cache, p.meta, scale, num_splits=splits)
    assert_close_verbose(out, golden, fp32_bound(golden), name=f"{case}/splits={splits}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("case", "splits"), [("decode", 2), ("mixed_bs8", 1)])
def test_triton_attention_low_precision(
    tri: ModuleType, dtype: torch.dtype, case: str, splits: int
) -> None:
    seqs, block_size, heads, dim = CASES[case]
    p = make_paged(seqs, block_size, heads, dim, dtype, seed=3)
    golden = paged_attention_ref(*f64_cache(p), p.meta, 0.125)
    eager = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    out = tri.paged_attention_triton(p.q, p.k_cache, p.v_cache, p.meta, 0.125, num_splits=splits)
    assert out.dtype == dtype
    assert_close_verbose(out, golden, lowp_bound(eager, golden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_write_kv(tri: ModuleType, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(9, 3, 20, generator=g).to(DEVICE, dtype)
    v = torch.randn(9, 3, 20, generator=g).to(DEVICE, dtype)
    slots = torch.tensor([5, -1, 0, 31, 8, -1, 17, 2, 30], device=DEVICE)
    caches = [torch.zeros(4, 8, 3, 20, dtype=dtype, device=DEVICE) for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots)
    tri.write_kv_triton(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0].view(-1, 3, 20)[31], k[3])
    assert int((caches[0].view(-1, 3, 20).abs().sum((1, 2)) > 0).sum()) == 7


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernel is the CPU path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_write_kv_equals_the_twin(dtype: torch.dtype) -> None:
    """One C++ call writes K and V where the twin runs two index_copy_; -1 skips a row, and
    strided rows (k|v as columns of one q|k|v output) are read as they lie."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(9, 2, 3, 20, generator=g).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([5, -1, 0, 31, 8, -1, 17, 2, 30])
    caches = [torch.zeros(4, 8, 3, 20, dtype=dtype) for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots)
    write_kv_cpu(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert int((caches[2].view(-1, 3, 20).abs().sum((1, 2)) > 0).sum()) == 7
    with pytest.raises(RuntimeError, match="outside the cache"):
        write_kv_cpu(k, v, caches[2], caches[3], torch.full((9,), 32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_twin_matches_naive_attention(case: str) -> None:
    seqs, block_size, heads, dim = CASES[case]
    p = make_paged(seqs, block_size, heads, dim, torch.float64, seed=7)
    golden = naive_attention(p, 0.3)
    out = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta, 0.3)
    assert_close_verbose(out, golden, fp32_bound(golden))


# per-sequence windows: 0 (global) beside windows shorter than a block, across block edges,
# longer than the context; the 130-key decode row starts its keys blocks in
WINDOWED = {
    "decode": (DECODE, 16, (6, 2), 32, [5, 0, 17, 100]),
    "mixed_bs8": (MIXED, 8, (6, 2), 32, [3, 9, 0, 1, 20, 64]),
    "prefill_gqa4": ([(19, 19), (12, 50)], 32, (8, 2), 64, [7, 33]),
}


def windowed(case: str, dtype: torch.dtype, seed: int) -> Paged:
    seqs, block_size, heads, dim, windows = WINDOWED[case]
    p = make_paged(seqs, block_size, heads, dim, dtype, seed=seed)
    p.meta = p.meta.with_windows(torch.tensor(windows, dtype=torch.int32, device=DEVICE))
    return p


@pytest.mark.parametrize("case", sorted(WINDOWED))
def test_twin_sliding_windows_match_naive_attention(case: str) -> None:
    p = windowed(case, torch.float64, seed=11)
    golden = naive_attention(p, 0.3)
    out = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta, 0.3)
    assert_close_verbose(out, golden, fp32_bound(golden))
    unwindowed = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta.with_windows(None), 0.3)
    assert (unwindowed - golden).abs().max() > 1e-3  # the windows do cut keys off


@pytest.mark.parametrize("case", sorted(WINDOWED))
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_sliding_windows_fp32(tri: ModuleType, case: str, splits: int) -> None:
    p = windowed(case, torch.float32, seed=5 + splits)
    golden = paged_attention_ref(*f64_cache(p), p.meta, 0.2)
    out = tri.paged_attention_triton(p.q, p.k_cache, p.v_cache, p.meta, 0.2, num_splits=splits)
    assert_close_verbose(out, golden, fp32_bound(golden), name=f"{case}/splits={splits}")


def test_triton_sliding_windows_bf16(tri: ModuleType) -> None:
    p = windowed("mixed_bs8", torch.bfloat16, seed=3)
    golden = paged_attention_ref(*f64_cache(p), p.meta, 0.125)
    eager = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    out = tri.paged_attention_triton(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    assert_close_verbose(out, golden, lowp_bound(eager, golden))


cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernel is the CPU path")


@cpu_only
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_kernel_matches_naive_attention(case: str) -> None:
    """The C++ decode kernel (prefill chunks still go through the twin's SDPA) against the
    float64 row-by-row golden; it computes in float32 whatever the input dtype."""
    seqs, block_size, heads, dim = CASES[case]
    p = make_paged(seqs, block_size, heads, dim, torch.float32, seed=11)
    golden = naive_attention(p, 0.3)
    out = paged_attention_cpu(p.q, p.k_cache, p.v_cache, p.meta, 0.3)
    assert_close_verbose(out, golden, fp32_bound(golden), name=case)


@cpu_only
@pytest.mark.parametrize(
    ("heads", "dim"), [((9, 1), 16), ((10, 2), 128), ((4, 4), 256)], ids=["g9", "g5", "d256"]
)
def test_cpu_kernel_head_groups_and_dims(heads: tuple[int, int], dim: int) -> None:
    """Groups wider than the kernel's register block (4 query heads share a pass over V),
    Gemma-sized head dims, and key counts on and off the 16-key blocks."""
    seqs = [(1, 1), (1, 15), (1, 16), (1, 47), (1, 300)]
    p = make_paged(seqs, 16, heads, dim, torch.float32, seed=3)
    golden = naive_attention(p, 0.1)
    out = paged_attention_cpu(p.q, p.k_cache, p.v_cache, p.meta, 0.1)
    assert_close_verbose(out, golden, fp32_bound(golden))


@cpu_only
def test_cpu_kernel_refuses_head_dims_off_its_lanes() -> None:
    p = make_paged(DECODE, 16, (6, 2), 24, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        paged_attention_cpu(p.q, p.k_cache, p.v_cache, p.meta, 0.2)
    golden = naive_attention(p, 0.2)  # the dispatch sends such dims to the twin instead
    assert_close_verbose(
        paged_attention(p.q, p.k_cache, p.v_cache, p.meta, 0.2), golden, fp32_bound(golden)
    )


@cpu_only
@pytest.mark.parametrize("dtype", LOW)
def test_cpu_kernel_low_precision(dtype: torch.dtype) -> None:
    seqs, block_size, heads, dim = CASES["decode"]
    p = make_paged([*seqs, (1, 300), (1, 2)], block_size, heads, dim, dtype, seed=5)
    golden = paged_attention_ref(*f64_cache(p), p.meta, 0.125)
    eager = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    out = paged_attention_cpu(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    assert out.dtype == dtype
    assert_close_verbose(out, golden, lowp_bound(eager, golden))


@cpu_only
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_cpu_kernel_bf16_dot_product_path(dim: int) -> None:
    """bf16 caches with head dims the AVX-512 BF16 path takes: within twice the bf16 twin's
    error of float64, and each sequence's output the same bits alone (items per KV head) as
    in a batch of many (items per sequence, all KV heads)."""
    seqs = [(1, n) for n in (1, 15, 16, 17, 47, 130, 300, 2, 33, 64)]
    p = make_paged(seqs, 16, (9, 3), dim, torch.bfloat16, seed=dim)
    golden = paged_attention_ref(*f64_cache(p), p.meta, 0.125)
    eager = paged_attention_ref(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    out = paged_attention_cpu(p.q, p.k_cache, p.v_cache, p.meta, 0.125)
    assert_close_verbose(out, golden, lowp_bound(eager, golden))
    for s in range(len(seqs)):
        one = PagedAttentionMetadata(
            block_tables=p.meta.block_tables[s : s + 1],
            context_lens=p.meta.context_lens[s : s + 1],
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            max_query_len=1,
            max_context_len=seqs[s][1],
        )
        alone = paged_attention_cpu(p.q[s : s + 1], p.k_cache, p.v_cache, one, 0.125)
        assert torch.equal(alone[0], out[s])


@cpu_only
@pytest.mark.parametrize("case", sorted(WINDOWED))
def test_cpu_kernel_sliding_windows(case: str) -> None:
    p = windowed(case, torch.float32, seed=13)
    golden = naive_attention(p, 0.3)
    out = paged_attention_cpu(p.q, p.k_cache, p.v_cache, p.meta, 0.3)
    assert_close_verbose(out, golden, fp32_bound(golden), name=case)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_entry_points_follow_the_forced_backend(tri: ModuleType, backend: str) -> None:
    p = make_paged(MIXED, 8, (6, 2), 32, torch.float32, seed=1)
    empty = [torch.full_like(p.k_cache, float("nan")) for _ in range(2)]
    with use_backend(backend):
        write_kv(torch.cat(p.keys), torch.cat(p.values), *empty, p.slots)
        out = paged_attention(p.q, *empty, p.meta, 0.2)
    golden = naive_attention(p, 0.2)
    assert_close_verbose(out, golden, fp32_bound(golden))


def test_metadata_validation() -> None:
    tables = torch.zeros(2, 3, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc"):
        PagedAttentionMetadata(tables, lens, torch.zeros(2, dtype=torch.int32), 1, 1)
    with pytest.raises(ValueError, match="context_lens"):
        PagedAttentionMetadata(tables, lens[:1], torch.zeros(3, dtype=torch.int32), 1, 1)
    with pytest.raises(ValueError, match="sliding_windows"):
        PagedAttentionMetadata(tables, lens, torch.zeros(3, dtype=torch.int32), 1, 1, lens[:1])
    p = make_paged(DECODE, 16, (6, 2), 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        paged_attention(p.q[:, :5], p.k_cache, p.v_cache, p.meta, 1.0)
