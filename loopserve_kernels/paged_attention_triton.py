"""Triton kernels for the paged KV write and paged (decode + chunked prefill) attention.

``_paged_attention_kernel`` is one flash-attention pass (online softmax in fp32, exp2) per
(sequence, block of query rows, KV head, KV split). Its rows are (query token, head of the GQA
group) pairs, so the K/V tile read for a KV head serves every query head that shares it. Keys
are fetched token by token through the block table, so any block size works. For decode
batches too small to fill the GPU, the KV range is split (flash-decoding) and
``_combine_splits_kernel`` merges the partial results by their log-sum-exp. A sliding window
(per sequence) masks, and skips, the keys before it.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from loopserve_kernels.dispatch import interpreter_enabled
from loopserve_kernels.paged_metadata import PagedAttentionMetadata, check_cache

_LOG2E = 1.4426950408889634
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 16


@triton.jit
def _write_kv_kernel(
    K_ptr,
    V_ptr,
    KCache_ptr,
    VCache_ptr,
    Slot_ptr,
    num_heads,
    head_dim,
    block_size,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``cache[slot // block_size, slot % block_size] = k[t]`` (and v) for one row t; -1 skips."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    keep = (tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.int64) + slot) >= 0  # -1: padding row
    mask = (heads[:, None] < num_heads) & (dims[None, :] < head_dim) & keep
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_co
    dst += heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(K_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(V_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(KCache_ptr + dst, k.to(KCache_ptr.dtype.element_ty), mask=mask)
    tl.store(VCache_ptr + dst, v.to(VCache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_attention_kernel(
    Q_ptr,
    KCache_ptr,
    VCache_ptr,
    BlockTable_ptr,
    ContextLen_ptr,
    QueryStart_ptr,
    Window_ptr,
    O_ptr,
    PartO_ptr,
    PartLse_ptr,
    scale_log2,
    group,
    head_dim,
    block_size,
    q_blocks,
    num_splits,
    stride_qt,
    stride_qh,
    stride_bt,
    stride_cb,
    stride_co,
    stride_ch,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    BLOCK_Q: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Causal softmax(q kᵀ · scale) v for BLOCK_Q query rows x one GQA group x one KV split.

    With HAS_WINDOW, sequence s's queries at position i see keys j > i - window[s] only
    (window 0: all), and the keys before the block's first window are never read."""
    seq = (tl.program_id(0) // q_blocks).to(tl.int64)
    q_block = tl.program_id(0) % q_blocks
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(QueryStart_ptr + seq).to(tl.int64)
    q_len = (tl.load(QueryStart_ptr + seq + 1) - q_start).to(tl.int64)
    ctx = tl.load(ContextLen_ptr + seq).to(tl.int64)

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * group + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < group)
    q_pos = ctx - q_len + tok
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(
        Q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    # keys this q block may see: up to its last row's position (none if the block is empty)
    kv_end = tl.where(
        q_block * BLOCK_Q < q_len, ctx - q_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q), 0
    )
    window = 0
    kv_begin = 0
    if HAS_WINDOW:
        window = tl.load(Window_ptr + seq).to(tl.int64)
        first = ctx - q_len + q_block * BLOCK_Q  # the block's first query position
        kv_begin = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
        kv_begin = tl.minimum(kv_begin, kv_end)
    chunk = tl.cdiv(tl.cdiv(kv_end - kv_begin, BLOCK_N), num_splits) * BLOCK_N
    kv_lo = kv_begin + split * chunk
    kv_hi = tl.minimum(kv_lo + chunk, kv_end)

    m_i = tl.full((BLOCK_Q * GROUP_PAD,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
    for n0 in range(kv_lo, kv_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_hi
        block = tl.load(BlockTable_ptr + seq * stride_bt + pos // block_size, mask=pos_ok, other=0)
        kv_off = (
            block.to(tl.int64) * stride_cb + (pos % block_size) * stride_co + kv_head * stride_ch
        )
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(KCache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VCache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
        visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible &= (window == 0) | (q_pos[:, None] - pos[None, :] < window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    row_t = q_start + tok
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(
            PartO_ptr
            + split * stride_ps
            + row_t[:, None] * stride_pt
            + head[:, None] * stride_ph
            + dims[None, :],
            out,
            mask=out_mask,
        )
        tl.store(PartLse_ptr + split * stride_ls + row_t * stride_lt + head, lse, mask=row_ok)
    else:
        tl.store(
            O_ptr + row_t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(O_ptr.dtype.element_ty),
            mask=out_mask,
        )


@triton.jit
def _combine_splits_kernel(
    PartO_ptr,
    PartLse_ptr,
    O_ptr,
    num_splits,
    head_dim,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_ot,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``o = Σ_s 2^(lse_s - m) o_s / Σ_s 2^(lse_s - m)`` for one (row, head)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = splits < num_splits
    lse = tl.load(
        PartLse_ptr + splits * stride_ls + t * stride_lt + h, mask=s_ok, other=float("-inf")
    )
    m = tl.max(lse, axis=0)
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    parts = tl.load(
        PartO_ptr + splits[:, None] * stride_ps + t * stride_pt + h * stride_ph + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < head_dim),
        other=0.0,
    )
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        O_ptr + t * stride_ot + h * stride_oh + dims,
        out.to(O_ptr.dtype.element_ty),
        mask=dims < head_dim,
    )


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) axis")


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton ``write_kv``: one program per row of k/v."""
    block_size, heads, dim = check_cache(k_cache, v_cache)
    _check_last_dim_contiguous(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if k.shape[0] == 0:
        return
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        heads, dim, block_size,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
    )  # fmt: skip


def default_num_splits(meta: PagedAttentionMetadata, programs: int, device: torch.device) -> int:
    """KV splits for a call: >1 only when decode-like work leaves most SMs idle."""
    by_occupancy = triton.cdiv(2 * _num_sms(device), max(programs, 1))
    by_length = triton.cdiv(meta.max_context_len, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(_MAX_SPLITS, by_occupancy, by_length))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton ``paged_attention``; ``num_splits`` overrides the flash-decoding KV split count."""
    block_size, kv_heads, dim = check_cache(k_cache, v_cache)
    _check_last_dim_contiguous(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides")
    t, q_heads, _ = q.shape
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    if t == 0 or meta.num_seqs == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    rows = 16 if meta.max_query_len <= 1 else 64
    block_q = max(1, rows // group_pad)
    q_blocks = triton.cdiv(max(meta.max_query_len, 1), block_q)
    programs = meta.num_seqs * q_blocks * kv_heads
    splits = num_splits or default_num_splits(meta, programs, q.device)
    part_o = part_lse = out
    if splits > 1:
        part_o = torch.empty((splits, t, q_heads, dim), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((splits, t, q_heads), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(dim))
    windows = meta.sliding_windows
    _paged_attention_kernel[(meta.num_seqs * q_blocks, kv_heads, splits)](
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc,
        meta.context_lens if windows is None else windows,
        out, part_o, part_lse,
        scale * _LOG2E, group, dim, block_size, q_blocks, splits,
        q.stride(0), q.stride(1), meta.block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        BLOCK_Q=block_q, GROUP_PAD=group_pad, BLOCK_N=64 if dim <= 128 else 32, BLOCK_D=block_d,
        SPLIT=splits > 1,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        DOT_FP32=q.dtype == torch.bfloat16 and interpreter_enabled(),
        HAS_WINDOW=windows is not None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(t, q_heads)](
            part_o, part_lse, out, splits, dim,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out
