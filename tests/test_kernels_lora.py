"""Fused LoRA linear: Triton kernels (interpreted on a CPU) and torch twins vs float64 goldens."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from loopserve_kernels.dense_lora import (
    dense_per_depth_linear,
    dense_per_depth_linear_ref,
    materialise_dense,
    prefer_dense,
)
from loopserve_kernels.dispatch import use_backend
from loopserve_kernels.lora_linear import (
    FusedLoRA,
    fuse_lora,
    fused_lora_linear,
    fused_lora_linear_ref,
    lora_linear,
    lora_linear_ref,
)
from loopserve_kernels.testing import (
    assert_close_verbose,
    check_device,
    fp32_bound,
    lowp_bound,
    triton_kernels,
)

DEVICE = check_device()
ON_GPU = DEVICE.type == "cuda"
N_OUT, K_IN = 100, 70  # N is not a multiple of any tile; K is not a multiple of BLOCK_K
ROWS = [1, 7, 33, 130] + ([1000, 2048] if ON_GPU else [])


@pytest.fixture(scope="module")
def tri() -> Iterator[ModuleType]:
    with triton_kernels("loopserve_kernels.lora_linear_triton") as (module,):
        yield module


def make_depths(m: int, num_depths: int, seed: int) -> torch.Tensor:
    """Shuffled depth ids over ``num_depths`` that leave depth 0 empty when there are ≥ 2."""
    g = torch.Generator().manual_seed(seed)
    low = 1 if num_depths > 1 else 0
    return torch.randint(low, num_depths, (m,), generator=g).to(DEVICE)


def make_lora(
    m: int, n: int, k: int, r: int, num_depths: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """x, W, A, B with entries of size ~1 in the output, on the test device."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    x = rand(m, k)
    w = rand(n, k, scale=k**-0.5)
    a = rand(num_depths, r, k, scale=k**-0.5)
    b = rand(num_depths, n, r, scale=max(r, 1) ** -0.5)
    return x, w, a, b


def f64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in ts]


def dense_golden(
    x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, depth: torch.Tensor
) -> torch.Tensor:
    """Plain dense math in float64: ``x[i] (W + B_d A_d)ᵀ`` row by row; no delta off [0, D)."""
    x, w, a, b = f64(x, w, a, b)
    out = []
    for i in range(x.shape[0]):
        d = int(depth[i])
        wi = w + b[d] @ a[d] if 0 <= d < a.shape[0] else w
        out.append(x[i] @ wi.T)
    return torch.stack(out)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("rank", [0, 8, 16, 64])
def test_triton_lora_fp32(tri: ModuleType, m: int, rank: int) -> None:
    num_depths = 1 + (m + rank) % 4
    x, w, a, b = make_lora(m, N_OUT, K_IN, rank, num_depths, torch.float32, seed=m * 100 + rank)
    depth = make_depths(m, num_depths, seed=m + rank)
    golden = lora_linear_ref(*f64(x, w, a, b), depth)
    y = tri.lora_matmul(x, w, a, b, depth)
    assert_close_verbose(y, golden, fp32_bound(golden))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "rank"), [(7, 16), (130, 64), (33, 8)])
def test_triton_lora_low_precision(tri: ModuleType, dtype: torch.dtype, m: int, rank: int) -> None:
    x, w, a, b = make_lora(m, N_OUT, K_IN, rank, 3, dtype, seed=m + rank)
    depth = make_depths(m, 3, seed=m)
    golden = lora_linear_ref(*f64(x, w, a, b), depth)
    eager = lora_linear_ref(x, w, a, b, depth)
    y = tri.lora_matmul(x, w, a, b, depth)
    assert y.dtype == dtype
    assert_close_verbose(y, golden, lowp_bound(eager, golden))


def test_triton_lora_int_depth_and_invalid_ids(tri: ModuleType) -> None:
    x, w, a, b = make_lora(33, N_OUT, K_IN, 16, 4, torch.float32, seed=5)
    golden = lora_linear_ref(*f64(x, w, a, b), 2)
    assert_close_verbose(tri.lora_matmul(x, w, a, b, 2), golden, fp32_bound(golden))
    depth = torch.tensor([-1, 4, 7, 3] * 8 + [0], device=DEVICE)  # off-range ids: no delta
    golden = dense_golden(x, w, a, b, depth)
    assert_close_verbose(tri.lora_matmul(x, w, a, b, depth), golden, fp32_bound(golden))


@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_shrink_split_k(tri: ModuleType, split_k: int) -> None:
    x, _, a, _ = make_lora(7, N_OUT, 300, 16, 2, torch.float32, seed=split_k)
    depth = make_depths(7, 2, seed=1)
    t = tri.lora_shrink(x, a, depth, split_k=split_k)
    assert t.shape[0] == split_k
    golden = torch.stack([x[i].double() @ a[int(d)].double().T for i, d in enumerate(depth)])
    assert_close_verbose(t.sum(0), golden, fp32_bound(golden))


def make_fused(num_depths: int, ranks: tuple[int, ...], dtype: torch.dtype) -> FusedLoRA:
    g = torch.Generator().manual_seed(sum(ranks))
    outs = (40, 24, 36)
    a_s = [(torch.randn(num_depths, r, K_IN, generator=g) / 8).to(DEVICE, dtype) for r in ranks]
    b_s = [
        (torch.randn(num_depths, o, r, generator=g) / 4).to(DEVICE, dtype)
        for o, r in zip(outs, ranks, strict=True)
    ]
    return fuse_lora(a_s, b_s)


@pytest.mark.parametrize("ranks", [(8, 16, 0), (16, 16, 16)])
def test_triton_fused_projection(tri: ModuleType, ranks: tuple[int, ...]) -> None:
    fused = make_fused(3, ranks, torch.float32)
    x, w, _, _ = make_lora(33, sum(fused.out_sizes), K_IN, 1, 1, torch.float32, seed=9)
    depth = make_depths(33, 3, seed=2)
    golden = dense_golden(x, w, fused.lora_a, fused.lora_b, depth)
    slices = (fused.out_sizes, fused.ranks)
    y = tri.lora_matmul(x, w, fused.lora_a, fused.lora_b, depth, out_slices=slices)
    assert_close_verbose(y, golden, fp32_bound(golden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dense_per_depth(tri: ModuleType, dtype: torch.dtype) -> None:
    x, w, a, b = make_lora(130, N_OUT, K_IN, 16, 4, dtype, seed=11)
    dense = materialise_dense(w, a, b)
    depth = make_depths(130, 4, seed=3)
    golden = dense_per_depth_linear_ref(*f64(x, dense), depth)
    y = tri.lora_matmul(x, dense, None, None, depth)
    bound = fp32_bound(golden)
    if dtype != torch.float32:
        bound = lowp_bound(dense_per_depth_linear_ref(x, dense, depth), golden)
    assert_close_verbose(y, golden, bound)


@pytest.mark.parametrize("int_depth", [False, True])
def test_twins_match_dense_math(int_depth: bool) -> None:
    x, w, a, b = make_lora(33, N_OUT, K_IN, 8, 3, torch.float64, seed=21)
    depth = make_depths(33, 3, seed=4)
    if int_depth:
        depth_arg: torch.Tensor | int = 1
        depth = torch.full((33,), 1, device=DEVICE)
    else:
        depth_arg = depth
    golden = dense_golden(x, w, a, b, depth)
    assert_close_verbose(lora_linear_ref(x, w, a, b, depth_arg), golden, fp32_bound(golden))
    dense = materialise_dense(w, a, b)
    y_dense = dense_per_depth_linear_ref(x, dense, depth_arg)
    assert_close_verbose(y_dense, golden, fp32_bound(golden))


def test_fused_twin_matches_dense_math() -> None:
    fused = make_fused(2, (8, 0, 16), torch.float64)
    x, w, _, _ = make_lora(33, sum(fused.out_sizes), K_IN, 1, 1, torch.float64, seed=3)
    depth = make_depths(33, 2, seed=5)
    golden = dense_golden(x, w, fused.lora_a, fused.lora_b, depth)
    assert_close_verbose(fused_lora_linear_ref(x, w, fused, depth), golden, fp32_bound(golden))
    b = fused.lora_b  # slices: out 40 / 24 / 36 rows, ranks 8 / 0 / 16 columns
    assert b[:, 40:64].abs().max() == 0  # the rank-0 slice gets no delta
    assert b[:, :40, 8:].abs().max() == 0 and b[:, 64:, :8].abs().max() == 0  # block diagonal
    assert b[:, :40, :8].abs().min() > 0 and b[:, 64:, 8:].abs().min() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entry_points_follow_the_forced_backend(
    tri: ModuleType, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    calls: list[str] = []
    real = tri.lora_matmul

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, "lora_matmul", spy)
    with use_backend(backend):
        x, w, a, b = make_lora(7, N_OUT, K_IN, 8, 2, torch.float32, seed=1)
        depth = make_depths(7, 2, seed=1)
        golden = dense_golden(x, w, a, b, depth)
        assert_close_verbose(lora_linear(x, w, a, b, depth), golden, fp32_bound(golden))
        fused = make_fused(2, (8, 8, 8), torch.float32)
        xf, wf, _, _ = make_lora(7, sum(fused.out_sizes), K_IN, 1, 1, torch.float32, seed=2)
        golden = dense_golden(xf, wf, fused.lora_a, fused.lora_b, depth)
        assert_close_verbose(fused_lora_linear(xf, wf, fused, depth), golden, fp32_bound(golden))
        dense = materialise_dense(w, a, b)
        golden = dense_per_depth_linear_ref(*f64(x, dense), depth)
        assert_close_verbose(dense_per_depth_linear(x, dense, depth), golden, fp32_bound(golden))
    assert calls == (["triton"] * 3 if backend == "triton" else [])


def test_validation_errors(tri: ModuleType) -> None:
    x, w, a, b = make_lora(7, N_OUT, K_IN, 8, 2, torch.float32, seed=1)
    with pytest.raises(ValueError, match="in_features"):
        tri.lora_matmul(x[:, :-1], w, a, b, 0)
    with pytest.raises(ValueError, match="lora_b shape"):
        tri.lora_matmul(x, w, a, b[:, :-1], 0)
    with pytest.raises(ValueError, match="depth must have shape"):
        tri.lora_matmul(x, w, a, b, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        tri.lora_matmul(x, w.double(), a, b, 0)
    with pytest.raises(ValueError, match="out of range"):
        lora_linear(x, w, a, b, 2)
    with pytest.raises(ValueError, match="kernel backend 'cuda'"), use_backend("cuda"):
        lora_linear(x, w, a, b, 0)


def test_prefer_dense_rule() -> None:
    assert prefer_dense(576, 576, 576)  # the exact (full-rank) default model
    assert prefer_dense(576, 576, 144)
    assert not prefer_dense(576, 576, 64)
    assert not prefer_dense(16384, 2048, 256)
    assert not prefer_dense(576, 576, 0)


def test_mismatch_report_is_verbose() -> None:
    golden = torch.zeros(4, 5, dtype=torch.float64)
    bad = golden.clone()
    bad[1, 2], bad[3, 4], bad[0, 0] = 1.0, float("nan"), float("inf")
    with pytest.raises(AssertionError, match=r"3/20 elements.*NaN 1, inf 1.*\(0, 0\)"):
        assert_close_verbose(bad, golden, 1e-3)
    assert_close_verbose(golden + 1e-4, golden, 1e-3)


def test_depth_segments_are_the_rows_of_each_depth_of_a_sorted_batch() -> None:
    """Slices where the rows are sorted by depth (depths past the factors get none), None
    where a gather is needed: unsorted, negative or empty."""
    from loopserve_kernels.lora_linear import depth_segments

    depth = torch.tensor([0, 0, 1, 3, 3, 5])
    segments = depth_segments(depth, 4)
    assert segments == [(0, 0, 2), (1, 2, 3), (3, 3, 5)]
    for d, start, stop in segments:
        assert (depth == d).nonzero().squeeze(1).tolist() == list(range(start, stop))
    assert depth_segments(torch.tensor([1, 0]), 2) is None
    assert depth_segments(torch.tensor([-1, 0]), 2) is None
    assert depth_segments(torch.zeros(0, dtype=torch.int64), 2) is None
