"""Conversion of a vanilla model into a Relaxed Recursive Transformer.

The shared block is initialised from the L original layers (stepwise / average / lower /
random); each unrolled position p = k + b·K then gets a LoRA delta from the truncated SVD of
its residual ``W_orig[p] − W_shared[k] ≈ U_r Σ_r V_rᵀ`` with ``B = U_r Σ_r`` and ``A = V_rᵀ``.
At full rank the converted model reproduces the source; at rank 0 it is the plain recursive
model. Norms and biases stay per position (they are tiny).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model.config import FULL_RANK, INIT_METHODS, LINEAR_MODULES, ModelConfig, RecursionConfig
from model.recursive import RecursiveLM


@dataclass
class ConversionReport:
    """What conversion kept: per module, the mean fraction of residual energy (Σσ² kept)."""

    init: str
    loops: int
    ranks: dict[str, int]
    energy_kept: dict[str, float] = field(default_factory=dict)
    source_params: int = 0
    converted_params: int = 0

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.converted_params / self.source_params


def resolve_ranks(config: ModelConfig, ranks: dict[str, int]) -> dict[str, int]:
    """Replace FULL_RANK entries by the module's full rank; clamp nothing silently."""
    return {m: config.full_rank(m) if r == FULL_RANK else r for m, r in ranks.items()}


def stepwise_indices(num_layers: int, block_layers: int) -> list[int]:
    """round(linspace(0, L−1, K)): evenly spaced, first and last layer kept."""
    return torch.linspace(0, num_layers - 1, block_layers).round().long().tolist()


def shared_block_init(
    weights: torch.Tensor, loops: int, init: str, generator: torch.Generator
) -> torch.Tensor:
    """The shared block [K, out, in] from the original per-layer weights [L, out, in]."""
    num_layers = weights.shape[0]
    k = num_layers // loops
    if init == "stepwise":
        return weights[stepwise_indices(num_layers, k)].clone()
    if init == "average":
        return weights.view(loops, k, *weights.shape[1:]).mean(0)
    if init == "lower":
        return weights[:k].clone()
    if init == "random":
        noise = torch.randn(k, *weights.shape[1:], generator=generator, dtype=torch.float32)
        return (noise * 0.02).to(weights.dtype)
    raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")


def svd_delta(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors (B = U_r Σ_r, A = V_rᵀ) of ``residual`` in float64, and the
    fraction of its energy they keep."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    total = float(s.pow(2).sum())
    kept = float(s[:rank].pow(2).sum()) / total if total > 0 else 1.0
    return u[:, :rank] * s[:rank], vh[:rank], kept


def convert(
    source: RecursiveLM,
    loops: int,
    init: str,
    ranks: dict[str, int],
    seed: int = 0,
    progress: bool = True,
) -> tuple[RecursiveLM, ConversionReport]:
    """Fold a vanilla ``source`` into ``loops`` loops with per-position LoRA deltas."""
    if not source.config.is_vanilla:
        raise ValueError("conversion needs a vanilla (non-recursive) source model")
    recursion = RecursionConfig(loops=loops, init=init, ranks=dict.fromkeys(LINEAR_MODULES, 0))
    config = source.config.with_recursion(recursion)
    ranks = resolve_ranks(config, {m: ranks.get(m, 0) for m in LINEAR_MODULES})
    config = config.with_recursion(RecursionConfig(loops=loops, init=init, ranks=ranks))
    target = RecursiveLM(config, dtype=source.dtype, device=source.device)
    k_size = config.block_layers
    gen = torch.Generator().manual_seed(seed)
    report = ConversionReport(init=init, loops=loops, ranks=ranks)
    src = source.state_dict()
    out: dict[str, torch.Tensor] = {
        n: src[n] for n in ("embed", "final_norm", "lm_head") if n in src
    }

    def per_position(t: torch.Tensor) -> torch.Tensor:
        # [L, 1, ...] -> [K, B, ...] with position p = k + b*K at [k, b].
        return t[:, 0].view(loops, k_size, *t.shape[2:]).transpose(0, 1).contiguous()

    out["input_norm"] = per_position(src["input_norm"])
    out["post_attn_norm"] = per_position(src["post_attn_norm"])
    for m in source.biases:
        out[f"biases.{m}"] = per_position(src[f"biases.{m}"])
    jobs = [
        (m, b, k)
        for m in LINEAR_MODULES
        if ranks[m] > 0
        for b in range(loops)
        for k in range(k_size)
    ]
    bar = tqdm(total=len(jobs), desc="SVD relaxation", unit="matrix", disable=not progress)
    for m in LINEAR_MODULES:
        orig = src[f"weights.{m}"]  # [L, out, in]
        shared = shared_block_init(orig, loops, init, gen)
        out[f"weights.{m}"] = shared
        r = ranks[m]
        if r == 0:
            report.energy_kept[m] = 0.0
            continue
        a = torch.zeros(k_size, loops, r, orig.shape[2], dtype=torch.float64)
        b_ = torch.zeros(k_size, loops, orig.shape[1], r, dtype=torch.float64)
        kept = []
        for b in range(loops):
            for k in range(k_size):
                residual = orig[k + b * k_size].double() - shared[k].double()
                b_[k, b], a[k, b], frac = svd_delta(residual, r)
                kept.append(frac)
                bar.update()
        out[f"lora_a.{m}"] = a.to(orig.dtype)
        out[f"lora_b.{m}"] = b_.to(orig.dtype)
        report.energy_kept[m] = sum(kept) / len(kept)
    bar.close()
    target.load_state_dict(out)
    report.source_params = source.num_parameters()
    report.converted_params = target.num_parameters()
    return target, report
