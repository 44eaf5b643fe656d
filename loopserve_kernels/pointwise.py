"""A block layer's pointwise chains — RMSNorm (optionally fused with the residual add before
it), rotate-half RoPE, silu(gate)·up — as one call each.

Eager torch runs each chain as 4-8 ops, every one a pass over its rows and a dispatch: about a
thousand small ops a step for SmolLM2's 30 layers, which at one decode row costs more than the
arithmetic. On the CPU, without autograd, the C++ kernels (``loopserve_kernels.cpu_kernels``) run
each chain in one pass, rounding where the twins' ops round; elsewhere the torch twins run (they are
the training path: autograd flows through them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loopserve_kernels.cpu_kernels import (
    cpu_kernel_available,
    rms_norm_cpu,
    rope_cpu_,
    silu_mul_cpu,
)
from loopserve_kernels.dispatch import cpu_kernel_mode


def _native(*tensors: torch.Tensor) -> bool:
    """Whether the C++ kernels take this call: CPU, no autograd through it, kernels built."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    mode = cpu_kernel_mode(tensors[0])
    return mode == "require" or (mode == "prefer" and cpu_kernel_available())


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 (as transformers' Llama does), cast back; weight [H] or [T, H]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of rows ``x [..., H]``; weight [H] or one row per row of x."""
    if x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous() and _native(x, weight):
        return rms_norm_cpu(x, weight, eps)[0]
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, RMSNorm(x + residual)): the residual stream and the next sublayer's
    input in one pass."""
    if (
        x.dim() == 2
        and x.stride(1) == 1
        and residual.is_contiguous()
        and weight.is_contiguous()
        and _native(x, residual, weight)
    ):
        normed, total = rms_norm_cpu(x, weight, eps, residual)
        return total, normed
    total = x + residual
    return total, rms_norm_ref(total, weight, eps)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, rotary_dim]. With partial rotary (GPT-NeoX)
    only the first rotary_dim features turn; the rest pass through."""
    if cos.shape[-1] < x.shape[-1]:
        rot, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
        return torch.cat((apply_rope_ref(rot, cos, sin), rest), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [T, heads, head_dim]``; in place (returning x) on the C++ path,
    so callers use the result, never x afterwards."""
    if (
        cos.shape[-1] == x.shape[-1]
        and x.stride(2) == 1
        and x.stride(1) == x.shape[2]
        and cos.is_contiguous()
        and sin.is_contiguous()
        and _native(x, cos, sin)
    ):
        rope_cpu_(x, cos, sin)
        return x
    return apply_rope_ref(x, cos, sin)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) · up of ``gate_up [T, 2·inter]`` (gate | up, as the fused projection
    writes them)."""
    if gate_up.dim() == 2 and gate_up.stride(1) == 1 and _native(gate_up):
        return silu_mul_cpu(gate_up)
    gate, up = gate_up.split(inter, dim=-1)
    return silu_mul_ref(gate, up)
