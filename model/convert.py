"""Conversion of a vanilla model into a Relaxed Recursive Transformer.

The shared block is initialised from the L original layers (stepwise / average / lower /
random); each unrolled position p = k + b·K then gets a LoRA delta. ``plain``: the truncated
SVD of its residual ``W_orig[p] − W_shared[k] ≈ U_r Σ_r V_rᵀ`` with ``B = U_r Σ_r`` and
``A = V_rᵀ`` (the paper's init; minimises the weight error). ``whitened`` and ``sequential``
minimise the layer's output error on calibration data instead (``model.reconstruct``).
At full rank every method reproduces the source; at rank 0 it is the plain recursive model.
Norms and biases stay per position (they are tiny).

Middle-cycle (``prefix_layers`` P, ``suffix_layers`` E): the first P and last E original
layers are copied unchanged into the model's unique stacks, and only the middle L − P − E
fold into the block as above; unrolled position p is then original layer P + p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model.config import (
    FULL_RANK,
    INIT_METHODS,
    LINEAR_MODULES,
    ModelConfig,
    RecursionConfig,
)
from model.reconstruct import (
    DATA_METHODS,
    Polish,
    data_aware_deltas,
)
from model.recursive import RecursiveLM

CONVERT_METHODS: tuple[str, ...] = ("plain", *DATA_METHODS)


@dataclass
class ConversionReport:
    """What conversion kept: per module, the mean fraction of residual energy (Σσ² kept;
    for the data-aware methods the whitened, i.e. output, energy on the calibration data).

    ``ranks`` is the stored rank per module, ``position_ranks[m][p]`` the rank each position
    really uses; ``effective_params`` counts the deltas at those ranks, ``converted_params``
    what the checkpoint stores (zero-padded to the stored ranks)."""

    init: str
    loops: int
    ranks: dict[str, int]
    method: str = "plain"
    prefix_layers: int = 0
    suffix_layers: int = 0
    position_ranks: dict[str, list[int]] = field(default_factory=dict)
    energy_kept: dict[str, float] = field(default_factory=dict)
    source_params: int = 0
    converted_params: int = 0
    effective_params: int = 0
    calibration_tokens: int = 0

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


def rank_table(
    config: ModelConfig,
    ranks: dict[str, int],
    position_ranks: dict[int, int] | None = None,
) -> dict[str, list[int]]:
    """Rank of every module at every unrolled position p of the block: ``ranks`` everywhere,
    except the positions in ``position_ranks`` (p -> rank or FULL_RANK for all their modules),
    each clamped to the module's full rank."""
    num_layers = config.shared_layers
    table = {}
    for m in config.arch.linear_modules:
        full = config.full_rank(m)
        base = full if ranks.get(m, 0) == FULL_RANK else ranks.get(m, 0)
        row = [base] * num_layers
        for p, r in (position_ranks or {}).items():
            if not 0 <= p < num_layers:
                raise ValueError(f"rank exception for position {p}: the model has {num_layers}")
            row[p] = full if r == FULL_RANK else min(r, full)
        if any(r > full for r in row):
            raise ValueError(f"rank for {m!r} exceeds its full rank {full}")
        table[m] = row
    return table


def delta_parameters(config: ModelConfig, table: dict[str, list[int]]) -> int:
    """Parameters the deltas of ``table`` need when each position keeps its own rank."""
    return sum(r * sum(config.arch.linear_shape(m)) for m, row in table.items() for r in row)


def allocate_budget(
    config: ModelConfig,
    spectra: dict[str, list[torch.Tensor]],
    output_energy: dict[str, list[float]],
    budget: int,
    fixed: dict[int, int] | None = None,
) -> dict[str, list[int]]:
    """Spend ``budget`` delta parameters where the whitened singular values buy the most.

    Singular value i of position p's whitened residual ``Δ S`` removes σᵢ² of that map's
    output error energy at a cost of out + in parameters. Measured relative to the map's
    output energy ``‖X Wᵀ‖²`` (so maps are comparable), the greedy takes the best gain per
    parameter first; within one matrix the σ are sorted, so each rank is a prefix. Positions
    in ``fixed`` keep their rank (rank_table's exceptions) and are not charged to the budget.
    """
    fixed = fixed or {}
    gains, owners = [], []
    for m, per_pos in spectra.items():
        cost = sum(config.arch.linear_shape(m))
        for p, sv in enumerate(per_pos):
            if p in fixed:
                continue
            cap = config.full_rank(m)
            g = sv[:cap].double().pow(2) / max(output_energy[m][p], 1e-30) / cost
            gains.append(g)
            owners.extend([(m, p, cost)] * g.numel())
    order = torch.cat(gains).argsort(descending=True).tolist()
    table = rank_table(config, dict.fromkeys(config.arch.linear_modules, 0), fixed)
    spent = 0
    for i in order:
        m, p, cost = owners[i]
        if spent + cost > budget:
            continue
        table[m][p] += 1
        spent += cost
    return table


def convert(
    source: RecursiveLM,
    loops: int,
    init: str,
    ranks: dict[str, int],
    seed: int = 0,
    progress: bool = True,
    method: str = "plain",
    calibration: torch.Tensor | None = None,
    position_ranks: dict[int, int] | None = None,
    rank_budget: int | None = None,
    damp: float = 0.01,
    polish: Polish | None = None,
    gram_cache: dict | None = None,
    prefix_layers: int = 0,
    suffix_layers: int = 0,
) -> tuple[RecursiveLM, ConversionReport]:
    """Fold a vanilla ``source`` into ``loops`` loops with per-position LoRA deltas.

    ``method``: 'plain' (SVD of the weight residual), 'whitened' or 'sequential' (fitted on
    the ``calibration`` windows [N, S]; see ``model.reconstruct``). ``position_ranks`` sets
    the rank of every module at some positions p (e.g. {0: FULL_RANK}); ``rank_budget``
    replaces the uniform ``ranks`` by a greedy allocation of that many delta parameters
    (needs calibration). Ranks that differ between positions are stored zero-padded to the
    module's largest rank (the checkpoint has one rank per module); the report counts both.
    ``gram_cache``: a dict reused across conversions of one source on the same calibration
    windows, so the whitened input covariances are computed once. ``prefix_layers`` /
    ``suffix_layers``: the middle-cycle layout (unique first / last layers, copied exactly;
    positions p count from the first shared layer).
    """
    if not source.config.is_vanilla:
        raise ValueError("conversion needs a vanilla (non-recursive) source model")
    if method not in CONVERT_METHODS:
        raise ValueError(f"method must be one of {CONVERT_METHODS}, got {method!r}")
    needs_data = method in DATA_METHODS or rank_budget is not None
    if needs_data and calibration is None:
        raise ValueError(f"method {method!r} / a rank budget needs calibration windows")
    if polish is not None and method != "sequential":
        raise ValueError("polish refines a sequential conversion; use method='sequential'")
    layout = {"prefix_layers": prefix_layers, "suffix_layers": suffix_layers}
    zero_ranks = dict.fromkeys(LINEAR_MODULES, 0)
    base = source.config.with_recursion(
        RecursionConfig(loops=loops, init=init, ranks=zero_ranks, **layout)
    )
    k_size = base.block_layers
    gen = torch.Generator().manual_seed(seed)
    src = source.state_dict()
    modules = base.arch.linear_modules
    mid = slice(prefix_layers, prefix_layers + base.shared_layers)  # the folded layers
    shared = {m: shared_block_init(src[f"weights.{m}"][mid], loops, init, gen) for m in modules}
    table = rank_table(base, ranks, position_ranks)
    fit_args = (calibration, damp)
    if rank_budget is not None:
        zero = rank_table(base, {})
        spectra = data_aware_deltas(
            source, shared, zero, loops, "whitened", *fit_args, None, progress, gram_cache, **layout
        )
        table = allocate_budget(
            base, spectra.singular_values, spectra.output_energy, rank_budget, position_ranks
        )
    max_ranks = {m: max(row) for m, row in table.items()}
    config = base.with_recursion(RecursionConfig(loops=loops, init=init, ranks=max_ranks, **layout))
    target = RecursiveLM(config, dtype=source.dtype, device=source.device)
    report = ConversionReport(
        init=init, loops=loops, ranks=max_ranks, method=method, position_ranks=table, **layout
    )
    out: dict[str, torch.Tensor] = {
        n: src[n] for n in ("embed", "final_norm", "final_norm_bias", "lm_head") if n in src
    }

    def per_position(t: torch.Tensor) -> torch.Tensor:
        # [L, 1, ...] -> [K, B, ...] with position p = k + b*K (layer P + p) at [k, b].
        return t[mid, 0].view(loops, k_size, *t.shape[2:]).transpose(0, 1).contiguous()

    layer_tensors = ["input_norm", "post_attn_norm"]
    layer_tensors += [f"biases.{m}" for m in source.biases] + [f"norms.{n}" for n in source.norms]
    for name in layer_tensors:
        out[name] = per_position(src[name])
    unique = {"prefix": slice(0, prefix_layers), "suffix": slice(mid.stop, None)}
    for stack, layers in unique.items():  # the source's own layers, per-layer tensors [n, 1, ...]
        if getattr(target, stack) is not None:
            for name in [*layer_tensors, *(f"weights.{m}" for m in modules)]:
                out[f"{stack}.{name}"] = src[name][layers]
    fitted = None
    if method in DATA_METHODS:
        fitted = data_aware_deltas(
            source, shared, table, loops, method, *fit_args, polish, progress, gram_cache, **layout
        )
        report.calibration_tokens = calibration.numel()
        for name, norms in fitted.norms.items():
            out[name] = torch.stack(norms).view(loops, k_size, -1).transpose(0, 1).contiguous()
    num_layers = base.shared_layers
    bar = tqdm(total=num_layers * len(modules), desc="deltas", disable=not progress)
    for m in modules:
        orig = src[f"weights.{m}"][mid]  # [K·B, out, in]
        out[f"weights.{m}"] = shared[m]
        r = max_ranks[m]
        kept = []
        a = torch.zeros(k_size, loops, r, orig.shape[2], dtype=torch.float64)
        b_ = torch.zeros(k_size, loops, orig.shape[1], r, dtype=torch.float64)
        for p in range(num_layers):
            k, b = p % k_size, p // k_size
            rp = table[m][p]
            if fitted is None:
                residual = orig[p].double() - shared[m][k].double()
                fb, fa, frac = svd_delta(residual, rp)
            else:
                sv = fitted.singular_values[m][p].pow(2)
                frac = float(sv[:rp].sum() / sv.sum()) if float(sv.sum()) > 0 else 1.0
                fb, fa = fitted.factors[m][p] if rp > 0 else (None, None)
            kept.append(frac)
            if rp > 0:
                b_[k, b, :, :rp], a[k, b, :rp] = fb, fa
            bar.update()
        if r > 0:
            out[f"lora_a.{m}"] = a.to(orig.dtype)
            out[f"lora_b.{m}"] = b_.to(orig.dtype)
        report.energy_kept[m] = sum(kept) / len(kept) if any(table[m]) else 0.0
    bar.close()
    target.load_state_dict(out)
    report.source_params = source.num_parameters()
    report.converted_params = target.num_parameters()
    padding = sum(
        (max_ranks[m] - r) * sum(base.arch.linear_shape(m)) for m, row in table.items() for r in row
    )
    report.effective_params = report.converted_params - padding
    return target, report
