"""Rotary position embeddings (Llama convention: rotate-half), with Llama-3 / linear scaling,
partial rotary (GPT-NeoX) and Gemma 3's separate base for sliding-window layers."""

from __future__ import annotations

import math

import torch

from loopserve_kernels.pointwise import apply_rope_ref as apply_rope
from model.config import ArchConfig

__all__ = ["apply_rope", "rope_cos_sin", "rope_inv_freq"]


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def local_rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """Gemma 3's sliding-window layers: their own base, never scaled."""
    assert arch.local_rope_theta is not None
    return _base_inv_freq(arch.local_rope_theta, arch.rotary_dim)


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] in float32, after the checkpoint's scaling rule."""
    inv_freq = _base_inv_freq(arch.rope_theta, arch.rotary_dim)
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for integer positions [T]; computed in float32 then cast."""
    inv_freq = inv_freq.to(positions.device, torch.float32, non_blocking=True)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
