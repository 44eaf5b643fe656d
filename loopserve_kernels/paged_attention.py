"""Paged attention over per-sequence block tables: the KV write, decode and (chunked) prefill.

The engine keeps one block table per (request, loop depth); a "sequence" here is one such
table. One call serves a ragged batch mixing decode rows (one query row) and prefill chunks
(several rows, causal against the cached prefix and themselves), so a step never has to be
all-prefill or all-decode.

KV cache of one block layer: ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
head_dim]``; token position p of sequence s lives in block ``block_tables[s, p // block_size]``
at offset ``p % block_size`` (flat slot ``block * block_size + offset``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopserve_kernels.cpu_kernels import (
    DECODE_LANES,
    cpu_kernel_available,
    paged_decode_cpu,
    prefill_chunks_cpu,
    write_kv_cpu,
)
from loopserve_kernels.dispatch import cpu_kernel_mode, kernel_backend
from loopserve_kernels.paged_metadata import PagedAttentionMetadata, check_cache


@dataclass(frozen=True)
class DecodeGather:
    """How the single-row (decode) sequences gather their K/V to one common width."""

    rows: torch.Tensor  # [S_dec] query rows
    blocks: torch.Tensor  # [S_dec · width] block ids, padded entries clamped to 0
    span: int  # width · block_size keys per sequence
    bias: torch.Tensor  # [S_dec · Hkv, 1, span] float32: 0, or -inf where a key is not seen
    past_rows: torch.Tensor  # rows of the heads-major [S_dec · Hkv · span, D] K/V not seen


@dataclass(frozen=True)
class TwinPlan:
    """Host lists and decode gather indices of one attention call in the torch twin."""

    starts: list[int]  # query_start_loc
    lengths: list[int]  # context_lens
    windows: list[int]  # sliding window per sequence, 0: none
    decode: DecodeGather | None
    chunks: list[int]  # sequences with several query rows (prefill chunks)

    @staticmethod
    def host_lists(meta: PagedAttentionMetadata) -> tuple[TwinPlan, list[int]]:
        """The plan without its decode gather, and the decode (one-row) sequences."""
        starts, lengths = meta.query_start_loc.tolist(), meta.context_lens.tolist()
        w = meta.sliding_windows
        windows = [0] * meta.num_seqs if w is None else w.tolist()
        rows = [starts[i + 1] - starts[i] for i in range(meta.num_seqs)]
        chunks = [i for i, n in enumerate(rows) if n > 1]
        seqs = [i for i, n in enumerate(rows) if n == 1]
        return TwinPlan(starts, lengths, windows, None, chunks), seqs

    @staticmethod
    def build(meta: PagedAttentionMetadata, block_size: int, heads_kv: int) -> TwinPlan:
        plan, seqs = TwinPlan.host_lists(meta)
        if not seqs:
            return plan
        starts, lengths, windows, chunks = plan.starts, plan.lengths, plan.windows, plan.chunks
        w = meta.sliding_windows
        device = meta.block_tables.device
        width = -(-max(lengths[i] for i in seqs) // block_size)
        span = width * block_size
        index = torch.tensor(seqs, device=device)
        tables = meta.block_tables.index_select(0, index)[:, :width]
        keys = torch.arange(span, device=device)[None, :]
        ctx = meta.context_lens[index, None]
        past = keys >= ctx
        if w is not None:  # the query at ctx - 1 sees keys past ctx - 1 - window
            win = w[index, None]
            past |= (win > 0) & (keys <= ctx - 1 - win)
        past = past[:, None, :].expand(len(seqs), heads_kv, span)  # [S, Hkv, span]
        bias = torch.zeros(past.shape, device=device).masked_fill_(past, float("-inf"))
        return TwinPlan(
            starts,
            lengths,
            windows,
            DecodeGather(
                rows=meta.query_start_loc[:-1].long()[index],
                blocks=tables.long().clamp_min(0).flatten(),
                span=span,
                bias=bias.reshape(-1, 1, span),
                past_rows=past.flatten().nonzero().squeeze(1),
            ),
            chunks,
        )


def twin_plan(meta: PagedAttentionMetadata, block_size: int, heads_kv: int) -> TwinPlan:
    """The torch twin's host-side work, done once per metadata (= once per step)."""
    key = ("twin_plan", block_size, heads_kv)
    if key not in meta.derived:
        meta.derived[key] = TwinPlan.build(meta, block_size, heads_kv)
    return meta.derived[key]


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch twin: scatter ``k, v [T, Hkv, D]`` into the caches at flat slots; -1 skips a row."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):  # the engine never pads; the check spares it three masked copies
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write this step's K/V rows into the paged cache in place (slot -1: padding, skipped)."""
    _, heads, dim = check_cache(k_cache, v_cache)
    t = slot_mapping.shape[0]
    if k.shape != (t, heads, dim) or v.shape != k.shape:
        raise ValueError(
            f"k and v must be {(t, heads, dim)}, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if kernel_backend(k) == "torch":
        mode = cpu_kernel_mode(k)
        native = (
            k.dtype == k_cache.dtype == v.dtype
            and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous()
            and k.stride(2) == v.stride(2) == 1
            and k.stride(1) == v.stride(1) == dim
        )
        if mode == "require" or (mode == "prefer" and native and cpu_kernel_available()):
            write_kv_cpu(k, v, k_cache, v_cache, slot_mapping)
        else:
            write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    from loopserve_kernels.paged_attention_triton import write_kv_triton

    write_kv_triton(k, v, k_cache, v_cache, slot_mapping)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous ``[length, Hkv, D]`` K or V of one sequence, gathered through its table."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)].long()
    return cache.index_select(0, blocks).flatten(0, 1)[:length]


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: DecodeGather,
    scale: float,
) -> torch.Tensor:
    """One batched attention for sequences with a single query row each.

    q: [S, Hq, D]. Every table is gathered to the same width, heads-major, and the keys a row
    does not see (past its length, or before its sliding window) get a -inf score and zero
    values: stale or NaN cache contents never reach the output. Measured on the 2-core CPU
    (bf16, SmolLM2 heads, S = 32, 176 keys): 0.55 ms a layer, against 1.25 ms for a broadcast
    mask and a scores copy; SDPA with a mask took 2-3 ms.
    """
    s, heads_q, dim = q.shape
    heads_kv, span = k_cache.shape[2], plan.span
    # One sequence computes in float32 (a lone small bf16 bmm costs ~5x its float32 twin: 51
    # vs 11 us); batches in the cache dtype (float32 copies of a 32-sequence batch cost more
    # than the bmm saves).
    dtype = torch.float32 if s == 1 else k_cache.dtype

    def heads_major(cache: torch.Tensor) -> torch.Tensor:  # [S·Hkv, span, D], a fresh copy
        t = cache.index_select(0, plan.blocks).view(s, span, heads_kv, dim).transpose(1, 2)
        out = torch.empty((s, heads_kv, span, dim), dtype=dtype, device=cache.device)
        return out.copy_(t).view(s * heads_kv, span, dim)

    k = heads_major(k_cache)
    v = heads_major(v_cache)
    for t in (k, v):
        t.view(-1, dim).index_fill_(0, plan.past_rows, 0)  # NaN + -inf would still be NaN
    qg = q.reshape(s * heads_kv, heads_q // heads_kv, dim).to(dtype)  # grouped by KV head
    scores = torch.bmm(qg, k.transpose(1, 2)).float().mul_(scale).add_(plan.bias)
    probs = scores.softmax(-1).to(dtype)
    return torch.bmm(probs, v).view(s, heads_q, dim).to(q.dtype)


def _prefill_chunks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    plan: TwinPlan,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Each sequence with several query rows: gather its K/V, causal-offset SDPA (GQA by
    repeating heads) within its sliding window if it has one, written into ``out``."""
    qsl, ctx = plan.starts, plan.lengths
    group = q.shape[1] // k_cache.shape[2]
    for s in plan.chunks:
        q_s = q[qsl[s] : qsl[s + 1]].transpose(0, 1)  # [Hq, q_len, D]
        q_len, length = q_s.shape[1], ctx[s]
        k = gather_kv(k_cache, meta.block_tables[s], length).transpose(0, 1)  # [Hkv, L, D]
        v = gather_kv(v_cache, meta.block_tables[s], length).transpose(0, 1)
        k, v = (t.repeat_interleave(group, dim=0).to(q.dtype) for t in (k, v))
        q_pos = torch.arange(length - q_len, length, device=q.device)
        back = q_pos[:, None] - torch.arange(length, device=q.device)[None, :]  # [q_len, L]
        mask = back >= 0
        if plan.windows[s]:
            mask &= back < plan.windows[s]
        # 4-D: torch's CPU flash kernel takes batched inputs only; [H, L, D] falls to the
        # unfused math path, ~8x slower for a 128-token chunk of SmolLM2 (1.1 vs 0.13 ms)
        o = F.scaled_dot_product_attention(q_s[None], k[None], v[None], attn_mask=mask, scale=scale)
        out[qsl[s] : qsl[s + 1]] = o[0].transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Torch twin: decode rows in one batched call; each prefill chunk gathers its K/V and runs
    causal-offset SDPA (GQA by repeating heads), within its sliding window if it has one."""
    out = torch.empty_like(q)
    plan = twin_plan(meta, k_cache.shape[1], k_cache.shape[2])
    if plan.decode is not None:
        rows = plan.decode.rows
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, plan.decode, scale)
    _prefill_chunks(q, k_cache, v_cache, meta, plan, scale, out)
    return out


@dataclass(frozen=True)
class CpuDecodePlan:
    """The decode sequences' tables, lengths and query rows, for the C++ kernel."""

    tables: torch.Tensor  # [S_dec, W] int32
    lengths: torch.Tensor  # [S_dec] int32
    rows: torch.Tensor  # [S_dec] int64
    windows: torch.Tensor  # [S_dec] int32 sliding windows (0: none), or [0]: none at all

    @staticmethod
    def empty(meta: PagedAttentionMetadata) -> CpuDecodePlan:
        """No decode sequences (an all-prefill step)."""
        tables = meta.block_tables[:0].contiguous()
        int32 = torch.zeros(0, dtype=torch.int32)
        return CpuDecodePlan(tables, int32, torch.zeros(0, dtype=torch.int64), int32)

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tables, self.lengths, self.rows, self.windows


Chunks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""The C++ prefill chunks' inputs: block tables, query start locations, context lengths,
windows (or empty), int64 indices of the chunk sequences."""


@dataclass(frozen=True)
class CpuPlan:
    """One attention call's host work for the C++ path, done once per step."""

    twin: TwinPlan
    decode: CpuDecodePlan | None  # None: no decode sequences
    chunks: Chunks | None  # None: no prefill chunks


def _cpu_plan(meta: PagedAttentionMetadata) -> CpuPlan:
    key = "cpu_plan"
    if key not in meta.derived:
        plan, seqs = TwinPlan.host_lists(meta)
        w = meta.sliding_windows
        windows = torch.zeros(0, dtype=torch.int32) if w is None else w.int().contiguous()
        decode = None
        if seqs:
            rows = meta.query_start_loc[:-1].long()
            tables, lens = meta.block_tables, meta.context_lens
            dec_windows = windows
            if len(seqs) < meta.num_seqs:
                index = torch.tensor(seqs, device=meta.block_tables.device)
                tables, lens, rows = (t.index_select(0, index) for t in (tables, lens, rows))
                dec_windows = windows if w is None else windows.index_select(0, index)
            decode = CpuDecodePlan(
                tables.contiguous(), lens.contiguous(), rows, dec_windows.contiguous()
            )
        chunks = None
        if plan.chunks:
            chunks = (
                meta.block_tables.contiguous(),
                meta.query_start_loc.int().contiguous(),
                meta.context_lens.int().contiguous(),
                windows,
                torch.tensor(plan.chunks, dtype=torch.int64),
            )
        meta.derived[key] = CpuPlan(plan, decode, chunks)
    return meta.derived[key]


@dataclass(frozen=True)
class DecodeInputs:
    """What a whole layer on the C++ path (``model.fused_layer``) takes from a step's
    attention backend: every layer's caches, the step's slots, its decode plan and its
    prefill chunks."""

    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    chunks: Chunks
    scale: float


def _no_chunks(meta: PagedAttentionMetadata) -> Chunks:
    empty = torch.zeros(0, dtype=torch.int32)
    return meta.block_tables, empty, empty, empty, torch.zeros(0, dtype=torch.int64)


def decode_inputs(
    meta: PagedAttentionMetadata,
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    slot_mapping: torch.Tensor,
    scale: float,
) -> DecodeInputs | None:
    """The inputs of a whole-layer call, or None where sliding windows apply or the head dim
    is off the decode kernel's lanes. Decode rows and prefill chunks may mix."""
    dim = k_caches[0].shape[-1]
    if meta.sliding_windows is not None or dim % DECODE_LANES:
        return None
    cpu = _cpu_plan(meta)
    decode = cpu.decode or CpuDecodePlan.empty(meta)
    return DecodeInputs(
        k_caches,
        v_caches,
        slot_mapping.long().contiguous(),
        decode.as_tuple(),
        cpu.chunks or _no_chunks(meta),
        scale,
    )


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The CPU path: decode rows through the C++ kernel (K/V read in place, once), prefill
    chunks through the C++ twin of ``_prefill_chunks`` (the same ops, without Python)."""
    out = torch.empty_like(q)
    cpu = _cpu_plan(meta)
    if cpu.decode is not None:
        paged_decode_cpu(q.contiguous(), k_cache, v_cache, *cpu.decode.as_tuple(), out, scale)
    if cpu.chunks is not None:
        prefill_chunks_cpu(q, k_cache, v_cache, cpu.chunks, out, scale)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of ``q [T, Hq, D]`` over the paged cache: decode and chunked prefill, GQA.

    Returns ``[T, Hq, D]`` in q's dtype; ``scale`` multiplies q·k (usually ``D ** -0.5``).
    """
    _, heads, dim = check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != dim or q.shape[1] % heads:
        raise ValueError(
            f"q must be [T, Hq, {dim}] with Hq a multiple of {heads} KV heads, got {tuple(q.shape)}"
        )
    if kernel_backend(q) == "torch":
        mode = cpu_kernel_mode(q)
        fits = dim % DECODE_LANES == 0
        if mode == "require" or (mode == "prefer" and fits and cpu_kernel_available()):
            return paged_attention_cpu(q, k_cache, v_cache, meta, scale)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
    from loopserve_kernels.paged_attention_triton import paged_attention_triton

    return paged_attention_triton(q, k_cache, v_cache, meta, scale)
