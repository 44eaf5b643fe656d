"""The per-family pieces of the layer math, chosen once from the config.

Llama, Qwen2, GPT-NeoX and Gemma 3 differ in a handful of places — the norm, the MLP's
activation (and gate), what the attention sees (QK-norm, partial rotary, a sliding window and
a RoPE base per layer) — not in the shape of the block. ``RecursiveLM`` calls these helpers
where the families differ, so one layer implementation serves all of them.

Everything that differs per original layer p (window, RoPE base) becomes a per-position table
``[K][B]`` (p = k + b·K): a shared block layer may be a sliding-window layer at one loop depth
and a global one at the next (Gemma 3 270M's 18 layers at B = 2: layer 5 is global, 14 is not).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from loopserve_kernels.pointwise import rms_norm
from model.config import ArchConfig
from model.rope import local_rope_inv_freq, rope_inv_freq


def norm(
    x: torch.Tensor, weight: torch.Tensor, arch: ArchConfig, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The family's norm over the last axis, in float32 as transformers computes it.

    ``rms``: ``w · x̂`` with x̂ cast back first (Llama); ``rms_offset``: ``(1 + w) · x̂`` cast
    after (Gemma); ``layer``: LayerNorm with bias (GPT-NeoX). weight/bias broadcast from the
    right: [H], or [T, H] per row; for per-head norms of [T, heads, D] pass [D] or [T, 1, D].
    """
    if arch.norm == "rms":  # Llama's: the C++ kernel on the CPU (loopserve_kernels.pointwise)
        return rms_norm(x, weight, arch.rms_norm_eps)
    xf = x.float()
    if arch.norm == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + arch.rms_norm_eps)
    if arch.norm == "rms_offset":
        return (xf * (1.0 + weight.float())).to(x.dtype)
    assert bias is not None, "LayerNorm needs its bias"
    return (xf * weight.float() + bias.float()).to(x.dtype)


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The MLP activation: silu (Llama), exact gelu (Pythia), tanh gelu (Gemma's GeGLU)."""
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


class DepthTable:
    """An int per (block layer k, loop depth b), from one per original layer p = k + b·K."""

    def __init__(self, per_layer: tuple[int, ...], block_layers: int, loops: int) -> None:
        self.rows = [
            [per_layer[k + b * block_layers] for b in range(loops)] for k in range(block_layers)
        ]

    def uniform(self, layer: int) -> int | None:
        """The layer's value when every depth has the same one, else None."""
        row = self.rows[layer]
        return row[0] if len(set(row)) == 1 else None

    def at(self, layer: int, depth: torch.Tensor | int) -> torch.Tensor | int:
        """The value for rows at ``depth``: an int when it is one for all rows, else [T]."""
        same = self.uniform(layer)
        if same is not None:
            return same
        if isinstance(depth, int):
            return self.rows[layer][depth]
        return self._tensor(depth.device)[layer].index_select(0, depth.long())

    @cache  # noqa: B019 (one table per model, a device or two)
    def _tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.int32, device=device)


class Rotary:
    """The RoPE frequencies each (block layer, depth) uses: one set for most families, a
    global and a local (sliding-window layers) set for Gemma 3. ``first``: the original layer
    of the stack's position 0, as in ``window_table``."""

    def __init__(self, arch: ArchConfig, block_layers: int, loops: int, first: int = 0) -> None:
        # float32 on the CPU on purpose (not buffers, so .to(bfloat16) cannot round them);
        # rope_cos_sin moves the few values to the positions' device.
        self.inv_freqs = [rope_inv_freq(arch)]
        local = tuple(int(w > 0) for w in _stack_windows(arch, block_layers * loops, first))
        if arch.local_rope_theta is not None and any(local):
            self.inv_freqs.append(local_rope_inv_freq(arch))
        else:
            local = (0,) * (block_layers * loops)
        self.variant = DepthTable(local, block_layers, loops)

    def select(
        self,
        tables: list[tuple[torch.Tensor, torch.Tensor]],
        layer: int,
        depth: torch.Tensor | int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim] of block layer ``layer`` for rows at ``depth``, from the
        per-variant ``tables`` (``rope_cos_sin`` of each of ``inv_freqs``)."""
        v = self.variant.at(layer, depth)
        if isinstance(v, int):
            return tables[v]
        local = v.bool()[:, None]
        (gc, gs), (lc, ls) = tables
        return torch.where(local, lc, gc), torch.where(local, ls, gs)


def _stack_windows(arch: ArchConfig, positions: int, first: int) -> tuple[int, ...]:
    """The windows of original layers ``first`` .. ``first + positions − 1`` (0: global)."""
    return arch.layer_windows[first : first + positions] or (0,) * positions


def window_table(
    arch: ArchConfig, block_layers: int, loops: int, first: int = 0
) -> DepthTable | None:
    """Sliding window per (block layer, depth), 0 = global; None for a stack without any.
    ``first``: the original layer of the stack's position 0 (a middle-cycle layout's block
    starts after its unique first layers)."""
    windows = _stack_windows(arch, block_layers * loops, first)
    if not any(windows):
        return None
    return DepthTable(windows, block_layers, loops)
