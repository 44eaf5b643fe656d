"""Triton kernels for the shared-weight matmul with per-row, per-depth low-rank deltas.

Two launches per call (punica's shrink/expand, with the expand fused into the base GEMM):

1. ``_lora_shrink_kernel``: ``T[s] = X[:, Ks] A[d(i)]ᵀ`` in fp32, split over K into ``s`` parts
   so that a handful of rows still spreads over the whole GPU.
2. ``_lora_matmul_kernel``: ``Y = X Wᵀ + cast(Σ_s T[s]) B[d(i)]ᵀ`` — the delta is added to the
   fp32 accumulator before the single store, so Y is written once and X read once.

Rows may sit at any depth. A tile loops over the depths between the smallest and largest depth
of its rows, masking the others, so a depth-sorted batch (what the scheduler produces) costs one
pass per tile and a shuffled one stays correct. Depth ids outside ``[0, D)`` get no delta,
as in ``lora_linear_ref``. The same GEMM kernel serves per-depth dense weights
(``PER_DEPTH_WEIGHT``), used when the rank is too high for the low-rank path to pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from loopserve_kernels.dispatch import interpreter_enabled

_TARGET_PROGRAMS = 264  # about two waves on an H100 (132 SMs); only sets the shrink's split-K
_MAX_SPLIT_K = 16


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + a @ b``; ``DOT_FP32`` upcasts first, for the interpreter's bf16 dot (see
    ``dot_in_fp32``), which gives the same products as bf16 tensor cores with fp32 accumulate."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _row_depths(Depth_ptr, rows, row_ok, scalar_depth, num_depths, PER_ROW_DEPTH: tl.constexpr):
    """Depth id per row of the tile, with -1 for rows that are out of range or have no delta."""
    if PER_ROW_DEPTH:
        depth = tl.load(Depth_ptr + rows, mask=row_ok, other=-1)
    else:
        depth = tl.where(row_ok, scalar_depth, -1)
    valid = (depth >= 0) & (depth < num_depths)
    return tl.where(valid, depth, -1).to(tl.int64)


@triton.jit
def _depth_range(depth, num_depths):
    """Smallest and largest valid depth in the tile (an empty range when there is none)."""
    lo = tl.min(tl.where(depth >= 0, depth, num_depths), axis=0)
    hi = tl.max(depth, axis=0)
    return lo, hi


@triton.jit
def _lora_shrink_kernel(
    X_ptr,
    A_ptr,
    Depth_ptr,
    T_ptr,
    M,
    K,
    R,
    num_depths,
    scalar_depth,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_ad,
    stride_ar,
    stride_ak,
    stride_ts,
    stride_tm,
    stride_tr,
    PER_ROW_DEPTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``T[s, i, :] = X[i, Ks] A[d(i), :, Ks]ᵀ`` in fp32 for the K range ``Ks`` of split ``s``."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    depth = _row_depths(Depth_ptr, rows, row_ok, scalar_depth, num_depths, PER_ROW_DEPTH)
    d_lo, d_hi = _depth_range(depth, num_depths)
    k_start = pid_s.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d in range(d_lo, d_hi + 1):
        sel = depth == d
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_end
            x = tl.load(
                X_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=sel[:, None] & k_ok[None, :],
                other=0.0,
            )
            a = tl.load(
                A_ptr + d * stride_ad + ranks[None, :] * stride_ar + ks[:, None] * stride_ak,
                mask=rank_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            acc = _mma(x, a, acc, INPUT_PRECISION, DOT_FP32)
    tl.store(
        T_ptr + pid_s * stride_ts + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
        acc,
        mask=row_ok[:, None] & rank_ok[None, :],
    )


@triton.jit
def _dot_tile(
    X_ptr,
    W_ptr,
    rows,
    row_sel,
    cols,
    col_ok,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """fp32 ``X[rows] W[cols]ᵀ`` over the full K, with unselected rows read as zero."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(
            X_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_sel[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            W_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = _mma(x, w, acc, INPUT_PRECISION, DOT_FP32)
    return acc


@triton.jit
def _lora_matmul_kernel(
    X_ptr,
    W_ptr,
    T_ptr,
    B_ptr,
    Depth_ptr,
    TileRank_ptr,
    Y_ptr,
    M,
    N,
    K,
    R,
    num_splits,
    num_depths,
    scalar_depth,
    stride_xm,
    stride_xk,
    stride_wd,
    stride_wn,
    stride_wk,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_bd,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    PER_ROW_DEPTH: tl.constexpr,
    PER_DEPTH_WEIGHT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    TILE_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``Y = X W_(d)ᵀ [+ (Σ_s T[s]) B[d]ᵀ]`` with one store; tiles in grouped order for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    depth = _row_depths(Depth_ptr, rows, row_ok, scalar_depth, num_depths, PER_ROW_DEPTH)
    d_lo, d_hi = _depth_range(depth, num_depths)

    if PER_DEPTH_WEIGHT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d in range(d_lo, d_hi + 1):
            acc += _dot_tile(
                X_ptr, W_ptr + d * stride_wd, rows, depth == d, cols, col_ok, K,
                stride_xm, stride_xk, stride_wn, stride_wk,
                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, DOT_FP32,
            )  # fmt: skip
    else:
        acc = _dot_tile(
            X_ptr, W_ptr, rows, row_ok, cols, col_ok, K,
            stride_xm, stride_xk, stride_wn, stride_wk,
            BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, DOT_FP32,
        )  # fmt: skip

    if HAS_LORA:
        if TILE_RANKS:
            r_lo = tl.load(TileRank_ptr + 2 * pid_n)
            r_hi = tl.load(TileRank_ptr + 2 * pid_n + 1)
        else:
            r_lo = 0
            r_hi = R
        for d in range(d_lo, d_hi + 1):
            sel = depth == d
            for r0 in range(r_lo, r_hi, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_ok = rs < r_hi
                t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for s in range(0, num_splits):
                    t += tl.load(
                        T_ptr + s * stride_ts + rows[:, None] * stride_tm + rs[None, :] * stride_tr,
                        mask=sel[:, None] & r_ok[None, :],
                        other=0.0,
                    )
                b = tl.load(
                    B_ptr + d * stride_bd + cols[None, :] * stride_bn + rs[:, None] * stride_br,
                    mask=col_ok[None, :] & r_ok[:, None],
                    other=0.0,
                )
                acc = _mma(t.to(B_ptr.dtype.element_ty), b, acc, INPUT_PRECISION, DOT_FP32)

    tl.store(
        Y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(Y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and launch options of ``_lora_matmul_kernel`` for one problem size."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def matmul_config(m: int, dtype: torch.dtype) -> MatmulConfig:
    """Heuristic tiles: skinny tiles for decode-sized batches, 128x128 for large ones."""
    wide_k = 64 if dtype != torch.float32 else 32
    if m <= 16:
        return MatmulConfig(16, 64, 128 if dtype != torch.float32 else 64, 4, 4)
    if m <= 64:
        return MatmulConfig(64, 64, wide_k, 4, 4)
    if m <= 256:
        return MatmulConfig(64, 128, wide_k, 4, 3)
    return MatmulConfig(128, 128, wide_k, 8, 3)


def _input_precision(dtype: torch.dtype) -> str | None:
    """IEEE fp32 dots for fp32 inputs, matching torch's default (no TF32) matmul."""
    return "ieee" if dtype == torch.float32 else None


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Upcast dot operands under the interpreter for bf16: its ``tl.dot`` multiplies the uint16
    bit patterns (triton-lang/triton#11584, unsupported upstream)."""
    return dtype == torch.bfloat16 and interpreter_enabled()


def _check_matrix(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} dtype {t.dtype} differs from x dtype {dtype}")


def _depth_args(depth: torch.Tensor | int, m: int, device: torch.device) -> tuple:
    """(depth tensor or None, scalar depth, per-row flag) for the kernels."""
    if isinstance(depth, int):
        return None, depth, False
    if depth.shape != (m,):
        raise ValueError(f"depth must have shape ({m},), got {tuple(depth.shape)}")
    if depth.device != device or depth.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"depth must be an int32/int64 tensor on {device}")
    return depth, 0, True


@lru_cache(maxsize=256)
def _tile_rank_bounds(
    out_sizes: tuple[int, ...], ranks: tuple[int, ...], block_n: int, device: torch.device
) -> torch.Tensor:
    """Per N-tile rank range ``[lo, hi)`` of a block-diagonal B: the slices the tile touches."""
    out_ends = torch.tensor(out_sizes).cumsum(0)
    rank_ends = torch.tensor(ranks).cumsum(0)
    bounds = []
    for start in range(0, int(out_ends[-1]), block_n):
        first = int((out_ends <= start).sum())
        last = int((out_ends <= min(start + block_n, int(out_ends[-1])) - 1).sum())
        lo = int(rank_ends[first - 1]) if first else 0
        bounds += [lo, int(rank_ends[last])]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    depth: torch.Tensor | int,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """fp32 partial products ``[split_k, T, R]`` whose sum over splits is ``x A[d(i)]ᵀ``."""
    m, k = x.shape
    _check_matrix("lora_a", lora_a, 3, x.dtype)
    num_depths, r, ka = lora_a.shape
    if ka != k:
        raise ValueError(f"lora_a in_features {ka} != x in_features {k}")
    depth_t, scalar, per_row = _depth_args(depth, m, x.device)
    block_m = 16 if m <= 16 else 64
    block_r = max(16, min(64, triton.next_power_of_2(r)))
    block_k = 128 if x.dtype != torch.float32 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = max(1, min(_MAX_SPLIT_K, k_blocks, _TARGET_PROGRAMS // tiles))
    if not 1 <= split_k <= k_blocks:
        raise ValueError(f"split_k={split_k} must lie in [1, {k_blocks}] for K={k}")
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    t = torch.empty((split_k, m, r), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r), split_k)
    _lora_shrink_kernel[grid](
        x, lora_a, depth_t if per_row else x, t,
        m, k, r, num_depths, scalar, k_per_split,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        PER_ROW_DEPTH=per_row, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=dot_in_fp32(x.dtype),
    )  # fmt: skip
    return t


def lora_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    depth: torch.Tensor | int,
    *,
    out_slices: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    split_k: int | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """Triton ``lora_linear``; a 3-D ``weight`` [D, out, in] selects a dense weight per depth.

    ``out_slices = (out_sizes, ranks)`` marks ``lora_b`` as block-diagonal (fused q|k|v or
    gate|up), so each output tile only multiplies the rank columns of the slices it covers.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, in], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {x.dtype}")
    m, k = x.shape
    per_depth_weight = weight.dim() == 3
    _check_matrix("weight", weight, 3 if per_depth_weight else 2, x.dtype)
    n, kw = weight.shape[-2:]
    if kw != k:
        raise ValueError(f"weight in_features {kw} != x in_features {k}")
    has_lora = lora_a is not None and lora_b is not None and lora_a.shape[1] > 0
    if has_lora and per_depth_weight:
        raise ValueError("per-depth dense weights already hold the delta: pass no LoRA factors")
    depth_t, scalar, per_row = _depth_args(depth, m, x.device)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    num_depths = weight.shape[0] if per_depth_weight else 0
    r = 0
    if has_lora:
        _check_matrix("lora_b", lora_b, 3, x.dtype)
        num_depths, r = lora_a.shape[:2]
        if lora_b.shape != (num_depths, n, r):
            raise ValueError(f"lora_b shape {tuple(lora_b.shape)} != {(num_depths, n, r)}")
        t = lora_shrink(x, lora_a, depth, split_k=split_k)
    cfg = config or matmul_config(m, x.dtype)
    tile_ranks = None
    if has_lora and out_slices is not None:
        if sum(out_slices[0]) != n or sum(out_slices[1]) != r:
            raise ValueError(f"out_slices {out_slices} do not add up to (out={n}, rank={r})")
        tile_ranks = _tile_rank_bounds(*out_slices, cfg.block_n, x.device)
    w_stride_d = weight.stride(0) if per_depth_weight else 0
    lora_t = t if has_lora else y
    lora_b_t = lora_b if has_lora else y
    t_strides = (t.stride(0), t.stride(1), t.stride(2)) if has_lora else (0, 0, 0)
    b_strides = (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)) if has_lora else (0, 0, 0)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _lora_matmul_kernel[grid](
        x, weight, lora_t, lora_b_t, depth_t if per_row else x,
        tile_ranks if tile_ranks is not None else x, y,
        m, n, k, r, lora_t.shape[0] if has_lora else 0, num_depths, scalar,
        x.stride(0), x.stride(1), w_stride_d, weight.stride(-2), weight.stride(-1),
        *t_strides, *b_strides, y.stride(0), y.stride(1),
        PER_ROW_DEPTH=per_row, PER_DEPTH_WEIGHT=per_depth_weight, HAS_LORA=has_lora,
        TILE_RANKS=tile_ranks is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=max(16, min(64, triton.next_power_of_2(max(r, 1)))), GROUP_M=8,
        INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=dot_in_fp32(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
