"""The C++ kernels of the CPU path (``cpu_kernels.cpp``), built on first use: paged decode
attention, the per-row max / log-sum-exp of logits, a block layer's pointwise chains
(RMSNorm with an optional residual add, RoPE in place, silu·mul) and bf16 and float32 GEMMs
over weight panels (``loopserve_kernels.packed_linear``).

torch's C++ extension loader compiles it once per machine into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; about a minute with the
torch headers) and loads it from there afterwards. The build directory is named after a hash
of the source and flags, so checkouts with different versions never rebuild over each other;
a build lock older than ``STALE_LOCK_S`` (left by a killed build, on which torch's loader
would wait forever) is removed first. A machine without a C++ compiler keeps the torch twins
and says so once in the log.
"""

from __future__ import annotations

import hashlib
import logging
import time
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
CFLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
)
STALE_LOCK_S = 600.0
DECODE_LANES = 16
"""The C++ decode kernel takes head dims that are a multiple of this (64, 128, 256 do);
smaller toy dims go to the twin."""


def _build_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()
    return f"loopserve_cpu_kernels_{digest[:12]}"


@cache
def _extension() -> ModuleType | None:
    from torch.utils.cpp_extension import _get_build_directory, load

    name = _build_name()
    try:
        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale build lock %s (a killed build left it)", lock)
            lock.unlink(missing_ok=True)
        return load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja: the twin runs instead
        log.warning("C++ CPU kernels unavailable (%s); using the torch twins", e)
        return None


def cpu_kernel_available() -> bool:
    """Whether the C++ kernels built (building them on the first call)."""
    return _extension() is not None


def _loaded() -> ModuleType:
    ext = _extension()
    if ext is None:
        raise RuntimeError("the C++ CPU kernels did not build (see the log)")
    return ext


def paged_decode_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor,
    windows: torch.Tensor,
    out: torch.Tensor,
    scale: float,
) -> None:
    """Write ``out[rows[s]]`` = attention of query row ``rows[s]`` over sequence ``s``'s keys
    (the last ``windows[s]`` of them when that is > 0; ``windows`` empty: no windows).

    q, out: [T, Hq, D]; caches [blocks, block_size, Hkv, D]; block_tables [S, W] int32,
    context_lens [S] int32 (every length ≥ 1), rows [S] int64, windows [S] or [0] int32.
    """
    _loaded().paged_decode(
        q, k_cache, v_cache, block_tables, context_lens, rows, windows, out, scale
    )


def row_max_lse_cpu(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits [R, V]``: (first argmax int64, max float32, log-sum-exp float32)."""
    argmax, top, lse = _loaded().row_max_lse(logits)
    return argmax, top, lse


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """[normed] or, with ``residual``, [normed(x + residual), x + residual]."""
    return _loaded().rms_norm(x, weight, eps, residual)


def rope_cpu_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _loaded().rope_(x, cos, sin)


def silu_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    return _loaded().silu_mul(gate_up)


def panel_gemm_cpu(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ W.T`` for a bf16 weight stored as ``panels [N/64, K/2, 64, 2]``."""
    return _loaded().panel_gemm(x, panels)


def panel_gemm_f32_cpu(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ W.T`` for a float32 weight stored as ``panels [N/16, K, 16]``."""
    return _loaded().panel_gemm_f32(x, panels)


def packed_linear_cpu(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for a weight in oneDNN's packed layout, rows padded as ``gemm_rows`` says."""
    return _loaded().packed_linear(x, packed)


def gemm_rows_cpu(rows: int) -> int:
    return int(_loaded().gemm_rows(rows))


def panel_gemm_built() -> bool:
    """Whether the build has the panel GEMM (the CPU has AVX-512 BF16), building on first call."""
    ext = _extension()
    return ext is not None and ext.panel_gemm_built()


def panel_f32_built() -> bool:
    """Whether the build has the float32 panel GEMM (the CPU has AVX2 and FMA)."""
    ext = _extension()
    return ext is not None and ext.panel_f32_built()


def panel_width(in_features: int) -> int:
    """The panel width the build computes fastest for ``in_features`` input columns: 32 (AMX
    tiles), 64 (AVX-512 BF16 dot products, no AMX), 0 (oneDNN's layout is faster)."""
    ext = _extension()
    return 0 if ext is None else int(ext.panel_width(in_features))


def amx_takes(in_features: int) -> bool:
    """Whether 32-column panels over ``in_features`` input columns can run (AMX)."""
    ext = _extension()
    return ext is not None and ext.amx_takes(in_features)


def write_kv_cpu(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """``k, v [T, Hkv, D]`` into the caches at flat int64 ``slots`` (-1: skipped), one call."""
    _loaded().write_kv(k, v, k_cache, v_cache, slots)


def prefill_chunks_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    scale: float,
) -> None:
    """Attention of the prefill chunks into ``out``: ``chunks`` is (block tables, query start
    locations, context lengths, windows or empty, int64 chunk sequence indices)."""
    _loaded().prefill_chunks(q, k_cache, v_cache, *chunks, out, scale)


def decode_layer_cpu(
    hidden: torch.Tensor,
    segments: list[int],
    norms: list[torch.Tensor],
    delta_weights: list[torch.Tensor | None],
    delta_dims: list[int],
    eps: float,
    weights: list[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    heads_q: int,
    scale: float,
) -> torch.Tensor:
    """One Llama-family layer over a step's decode rows and prefill chunks
    (``model.fused_layer``): ``segments`` are (start, stop) row pairs, one per depth present,
    ``norms`` each one's (input, post-attention) norm, ``delta_weights`` / ``delta_dims``
    each one's packed low-rank deltas per group (empty without deltas); ``weights`` are the
    packed q|k|v, o, gate|up and down the depths share; ``decode`` is paged_decode's
    (tables, lengths, rows, windows) for the decode sequences, ``chunks`` prefill_chunks_cpu's;
    returns the layer's output rows."""
    qkv, o, gate_up, down = weights
    return _loaded().decode_layer(
        hidden,
        segments,
        norms,
        delta_weights,
        delta_dims,
        eps,
        qkv,
        o,
        gate_up,
        down,
        cos,
        sin,
        k_cache,
        v_cache,
        slots,
        *decode,
        *chunks,
        heads_q,
        scale,
    )


def fill_kv_layers_cpu(
    hidden: torch.Tensor,
    segments: list[int],
    norms: list[list[torch.Tensor]],
    delta_weights: list[list[torch.Tensor | None]],
    delta_dims: list[list[int]],
    eps: float,
    qkv_weights: list[list[torch.Tensor]],
    cos: list[torch.Tensor],
    sin: list[torch.Tensor],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    slots: torch.Tensor,
    heads_q: int,
) -> None:
    """K/V of fill rows (exited tokens' hidden states at the depths they skipped) for every
    layer of the block in one call, written at ``slots``: per layer and segment (as
    ``decode_layer_cpu``'s, q|k|v deltas only) its input norm and packed q|k|v weight; ``cos``,
    ``sin`` and the caches one per layer."""
    _loaded().fill_kv_layers(
        hidden,
        segments,
        norms,
        delta_weights,
        delta_dims,
        eps,
        qkv_weights,
        cos,
        sin,
        k_caches,
        v_caches,
        slots,
        heads_q,
    )


def low_rank_delta_cpu(
    x: torch.Tensor,
    shrink_t: torch.Tensor,
    expands_t: list[torch.Tensor | None],
    out_sizes: tuple[int, ...],
    ranks: tuple[int, ...],
) -> torch.Tensor:
    """``x [T, in]`` through one float32 low-rank delta stored transposed (``Aᵀ [in, Σr]``,
    ``B_sᵀ [r_s, out_s]`` or None): ``[T, Σout]``, zero where a slice has rank 0."""
    return _loaded().low_rank_delta(x, shrink_t, expands_t, list(out_sizes), list(ranks))
