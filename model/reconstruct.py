"""Data-aware deltas: fit each position's low-rank delta to what its layer does on real inputs.

For a linear map at unrolled position p with original weight ``W`` [out, in], shared weight
``W_s`` and inputs ``X`` [N, in] (rows of calibration tokens), every method picks the rank-r
delta ``M = B A`` that minimises an output error, in closed form:

- **whitened** (SVD-LLM, Wang et al. 2024): ``‖X (Δ − M)ᵀ‖`` with ``Δ = W − W_s``. With
  ``C = XᵀX + λI = S Sᵀ`` (Cholesky) that is ``‖(Δ − M) S‖``, so the optimum is the truncated
  SVD ``Δ S ≈ U_r Σ_r V_rᵀ`` mapped back: ``B = U_r Σ_r``, ``A = V_rᵀ S⁻¹``.
- **sequential**: the converted model's *own* inputs ``X̂`` (its earlier positions already
  converted) must reproduce the original layer's outputs ``X Wᵀ``:
  ``min ‖X̂ (W_s + M)ᵀ − X Wᵀ‖² + λ‖M − Δ‖²``. The unconstrained optimum is
  ``M* = (W XᵀX̂ − W_s X̂ᵀX̂ + λΔ)(X̂ᵀX̂ + λI)⁻¹`` and the objective is
  ``const + ‖(M − M*) S‖²`` with ``S Sᵀ = X̂ᵀX̂ + λI``: the whitened SVD of ``M*``.
  Inside a layer the maps are fitted in data-flow order (q, k, v; then o on the converted
  attention output; gate, up; down), so each sees the converted inputs it will see served.

The damping ``λ = damp · mean(diag XᵀX)`` pulls toward the plain delta, never toward zero,
so with ``X̂ = X`` the sequential target is exactly ``Δ``: every method is exact at full rank.
An optional bounded polish then runs Adam on each position's factors and norms against the
original layer's output on the converted model's own input.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from model.attention import CausalAttention
from model.config import ArchConfig
from model.families import Rotary, activate, norm
from model.recursive import RecursiveLM
from model.rope import apply_rope, rope_cos_sin

Factors = tuple[torch.Tensor, torch.Tensor]  # (B [out, r], A [r, in]) in float64
DATA_METHODS: tuple[str, ...] = ("whitened", "sequential")


@dataclass(frozen=True)
class Polish:
    """Bounds of the per-position polish: at most ``steps`` Adam steps per position and
    ``seconds`` in all (split evenly over the positions still to come)."""

    steps: int = 50
    seconds: float = 60.0
    lr: float = 1e-4
    batch_windows: int = 8

    def __post_init__(self) -> None:
        if self.steps < 0 or self.seconds < 0 or self.lr <= 0 or self.batch_windows < 1:
            raise ValueError(
                f"polish needs steps, seconds >= 0, lr > 0, batch_windows >= 1: {self}"
            )


def damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``gram + λI`` with ``λ = damp · mean(diag gram)`` (a tiny floor if the data is zero)."""
    lam = damp * float(gram.diagonal().mean()) + 1e-12
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def whitened_factors(
    target: torch.Tensor, gram: torch.Tensor, rank: int
) -> tuple[Factors, torch.Tensor]:
    """Best rank-r ``B A`` for ``min ‖(target − B A) S‖`` with ``S Sᵀ = gram`` (positive
    definite, damped), and the whitened singular values (descending). float64 throughout."""
    s = torch.linalg.cholesky(gram)
    u, sv, vh = torch.linalg.svd(target @ s, full_matrices=False)
    b = u[:, :rank] * sv[:rank]
    # A = V_rᵀ S⁻¹  <=>  Sᵀ Aᵀ = V_r
    a = torch.linalg.solve_triangular(s.T, vh[:rank].T, upper=True).T
    return (b, a), sv


def refit_target(
    w: torch.Tensor,
    w_shared: torch.Tensor,
    cross: torch.Tensor,
    gram: torch.Tensor,
    damp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential target ``M*`` and its damped gram (see the module docstring).

    cross = XᵀX̂ [in, in]; gram = X̂ᵀX̂ [in, in]; all float64.
    """
    g = damped(gram, damp)
    lam = g[0, 0] - gram[0, 0]
    delta = w - w_shared
    rhs = w @ cross - w_shared @ gram + lam * delta  # [out, in]
    target = torch.linalg.solve(g, rhs.T).T  # rhs · g⁻¹ (g symmetric)
    return target, g


def _gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """xᵀy in float64 (the matmul in x's precision: float32 for big calibration sets)."""
    return (x.T @ (x if y is None else y)).double()


@dataclass
class PositionWeights:
    """Dense weights of unrolled position ``position``: linear maps [out, in], the norms
    conversion refits (input, post_attn), the family's other norms and the biases."""

    weights: dict[str, torch.Tensor]
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    biases: dict[str, torch.Tensor]
    position: int = 0
    norms: dict[str, torch.Tensor] = field(default_factory=dict)


def source_position(source: RecursiveLM, p: int) -> PositionWeights:
    """The vanilla source's layer p (detached: conversion fits, it does not train)."""
    return PositionWeights(
        weights={m: w[p].detach() for m, w in source.weights.items()},
        input_norm=source.input_norm[p, 0].detach(),
        post_attn_norm=source.post_attn_norm[p, 0].detach(),
        biases={m: bias[p, 0].detach() for m, bias in source.biases.items()},
        position=p,
        norms={n: t[p, 0].detach() for n, t in source.norms.items()},
    )


class LayerMath:
    """The layer on dense per-position weights, split where conversion needs taps; the
    family pieces are ``model.families``' (the model's own), per original position.

    Rows are ``n`` windows of ``seq_len`` tokens, concatenated: [n · seq_len, H].
    """

    def __init__(
        self,
        arch: ArchConfig,
        seq_len: int,
        n: int,
        dtype: torch.dtype = torch.float32,
        tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.arch = arch
        self.rotary = Rotary(arch, arch.num_layers, 1)  # one "loop": a table per position
        if tables is None:
            positions = torch.arange(seq_len).repeat(n)
            tables = [rope_cos_sin(f, positions, dtype) for f in self.rotary.inv_freqs]
        self.tables = tables
        self.attention = CausalAttention([seq_len] * n)

    def rows(self, n_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The RoPE tables of the first ``n_rows`` rows (whole windows: the same positions)."""
        return [(c[:n_rows], s_[:n_rows]) for c, s_ in self.tables]

    def lin(self, pw: PositionWeights, m: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ pw.weights[m].T
        return y + pw.biases[m] if m in pw.biases else y

    def heads(self, pw: PositionWeights, m: str, x: torch.Tensor) -> torch.Tensor:
        """q or k [T, heads, D] of normed input x: projection, QK-norm, RoPE."""
        a = self.arch
        y = self.lin(pw, m, x).view(x.shape[0], -1, a.head_dim)
        if a.qk_norm:
            y = norm(y, pw.norms[m], a)
        cos, sin = self.rotary.select(self.tables, pw.position, 0)
        return apply_rope(y, cos, sin)

    def attn(self, pw: PositionWeights, x: torch.Tensor) -> torch.Tensor:
        """Attention output before o: x [T, H] (normed) -> [T, Hq·D]."""
        a = self.arch
        q = self.heads(pw, "q", x)
        if a.attn_scale != a.head_dim**-0.5:
            q = q * (a.attn_scale * a.head_dim**0.5)
        k = self.heads(pw, "k", x)
        v = self.lin(pw, "v", x).view(-1, a.num_kv_heads, a.head_dim)
        window = a.layer_windows[pw.position] if a.layer_windows else 0
        if window:
            return self.attention(0, q, k, v, window=window)
        return self.attention(0, q, k, v)

    def norm(self, h: torch.Tensor, pw: PositionWeights, name: str) -> torch.Tensor:
        """Norm ``name`` of position ``pw``: input / post_attn (refitted), or a family one."""
        a = self.arch
        if name in ("input", "post_attn"):
            weight = pw.input_norm if name == "input" else pw.post_attn_norm
            bias = pw.norms[f"{name}_bias"] if a.norm == "layer" else None
            return norm(h, weight, a, bias)
        return norm(h, pw.norms[name], a)

    def out_norm(self, h: torch.Tensor, pw: PositionWeights, name: str) -> torch.Tensor:
        """Gemma's norm of the attention / MLP output; the identity elsewhere."""
        return self.norm(h, pw, name) if self.arch.sandwich_norm else h

    def mlp_inner(self, pw: PositionWeights, x: torch.Tensor) -> torch.Tensor:
        """What ``down`` reads: act(gate) · up, or act(up) for an ungated MLP."""
        act = self.arch.hidden_act
        if self.arch.gated_mlp:
            return activate(self.lin(pw, "gate", x), act) * self.lin(pw, "up", x)
        return activate(self.lin(pw, "up", x), act)

    def forward(self, pw: PositionWeights, h: torch.Tensor) -> torch.Tensor:
        o = self.out_norm(
            self.lin(pw, "o", self.attn(pw, self.norm(h, pw, "input"))), pw, "attn_out"
        )
        mid = h + o
        x2 = self.norm(h if self.arch.parallel_residual else mid, pw, "post_attn")
        return mid + self.out_norm(self.lin(pw, "down", self.mlp_inner(pw, x2)), pw, "mlp_out")


FitFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
GROUP: dict[str, str] = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "o_in",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "down_in",
}  # maps that read the same input


@torch.no_grad()
def input_grams(
    source: RecursiveLM,
    windows: torch.Tensor,
    cache: dict[tuple[int, str], torch.Tensor] | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """``XᵀX`` (float64) of every distinct linear-map input of every source layer, keyed
    (layer, GROUP); filled into and read from ``cache`` when given."""
    grams = {} if cache is None else cache
    num_layers = source.config.arch.num_layers
    if all((p, g) in grams for p in range(num_layers) for g in set(GROUP.values())):
        return grams
    n, s = windows.shape
    lm = LayerMath(source.config.arch, s, n, source.dtype)
    h = source.embed_tokens(windows.reshape(-1).to(source.device))
    for p in range(num_layers):
        pw = source_position(source, p)

        def record(m: str, x: torch.Tensor, _xh: torch.Tensor, p: int = p, pw=pw) -> torch.Tensor:
            if (p, GROUP[m]) not in grams:
                grams[(p, GROUP[m])] = _gram(x)
            return pw.weights[m]

        h, _ = fitted_layer(lm, pw, replace(pw, weights=dict(pw.weights)), h, None, record)
    return grams


def fitted_layer(
    lm: LayerMath,
    orig: PositionWeights,
    conv: PositionWeights,
    h: torch.Tensor,
    hh: torch.Tensor | None,
    fit: FitFn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the original layer on ``h`` and the converted one on ``hh``, fitting each of the
    converted linear maps (``fit(m, X, X̂)`` -> dense weight) in data-flow order. With
    ``hh`` None only the original runs and every fit sees ``X̂ = X`` (the whitened method)."""
    same = hh is None
    x = lm.norm(h, orig, "input")
    xh = x if same else lm.norm(hh, conv, "input")
    for m in ("q", "k", "v"):
        conv.weights[m] = fit(m, x, xh)
    a = lm.attn(orig, x)
    ah = a if same else lm.attn(conv, xh)
    conv.weights["o"] = fit("o", a, ah)
    mid = h + lm.out_norm(lm.lin(orig, "o", a), orig, "attn_out")
    midh = mid if same else hh + lm.out_norm(lm.lin(conv, "o", ah), conv, "attn_out")
    parallel = lm.arch.parallel_residual  # the MLP reads the layer's input, not mid
    x2 = lm.norm(h if parallel else mid, orig, "post_attn")
    x2h = x2 if same else lm.norm(hh if parallel else midh, conv, "post_attn")
    for m in ("gate", "up") if lm.arch.gated_mlp else ("up",):
        conv.weights[m] = fit(m, x2, x2h)
    act = lm.mlp_inner(orig, x2)
    acth = act if same else lm.mlp_inner(conv, x2h)
    conv.weights["down"] = fit("down", act, acth)
    out = mid + lm.out_norm(lm.lin(orig, "down", act), orig, "mlp_out")
    return out, (out if same else midh + lm.out_norm(lm.lin(conv, "down", acth), conv, "mlp_out"))


@dataclass
class DataAwareResult:
    """Per module, per position p: factors (None at rank 0), the whitened singular values and
    (whitened method) the original map's output energy ``‖X Wᵀ‖²``."""

    factors: dict[str, list[Factors | None]]
    singular_values: dict[str, list[torch.Tensor]]
    norms: dict[str, list[torch.Tensor]]  # polished per-position norms (input, post_attn)
    output_energy: dict[str, list[float]]


def data_aware_deltas(
    source: RecursiveLM,
    shared: dict[str, torch.Tensor],
    ranks: dict[str, list[int]],
    loops: int,
    method: str,
    windows: torch.Tensor,
    damp: float = 0.01,
    polish: Polish | None = None,
    progress: bool = True,
    gram_cache: dict[tuple[int, str], torch.Tensor] | None = None,
    prefix_layers: int = 0,
    suffix_layers: int = 0,
) -> DataAwareResult:
    """Fit every position's deltas with ``method`` ('whitened' or 'sequential') on the
    calibration ``windows`` [N, S]; ``shared[m]`` is the block [K, out, in], ``ranks[m][p]``
    the rank at position p. The whitened method needs only the source's input covariances:
    pass the same ``gram_cache`` dict to later whitened conversions of the same source and
    windows to compute them once.

    Middle-cycle: the block folds original layers ``prefix_layers`` .. L − ``suffix_layers``
    − 1 (position p is layer P + p; the results are indexed by p). The unique first layers
    are the source's own, so the converted inputs equal the original ones up to layer P; the
    unique last layers come after every fitted position and need nothing."""
    if method not in DATA_METHODS:
        raise ValueError(f"data-aware method must be one of {DATA_METHODS}, got {method!r}")
    arch = source.config.arch
    first, end = prefix_layers, arch.num_layers - suffix_layers
    num_layers, k_size = end - first, (end - first) // loops
    n, s = windows.shape
    lm = LayerMath(arch, s, n, source.dtype)
    with torch.no_grad():
        h = source.embed_tokens(windows.reshape(-1).to(source.device))
        if method == "sequential":  # through the unique first layers, exactly the source's
            for layer in range(first):
                h = lm.forward(source_position(source, layer), h)
    hh = h
    factors: dict[str, list[Factors | None]] = {m: [] for m in shared}
    svals: dict[str, list[torch.Tensor]] = {m: [] for m in shared}
    energy: dict[str, list[float]] = {m: [] for m in shared}
    norms: dict[str, list[torch.Tensor]] = {"input_norm": [], "post_attn_norm": []}
    if method == "whitened":
        source_grams = input_grams(source, windows, gram_cache)
    start = time.perf_counter()
    bar = tqdm(total=num_layers, desc=f"{method} deltas", unit="layer", disable=not progress)
    for p in range(num_layers):
        orig = source_position(source, first + p)
        conv = replace(orig, weights=dict(orig.weights))
        k = p % k_size

        memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def fit(
            m: str, x: torch.Tensor, xh: torch.Tensor, p: int = p, k: int = k, memo: dict = memo
        ) -> torch.Tensor:
            w, ws = source.weights[m][first + p].detach().double(), shared[m][k].double()
            if method == "whitened":
                g0 = source_grams[(first + p, GROUP[m])]
                energy[m].append(float(((w @ g0) * w).sum()))  # ‖X Wᵀ‖² = tr(W C Wᵀ)
                target, g = w - ws, damped(g0, damp)
            else:
                if GROUP[m] not in memo:  # q, k, v (and gate, up) share their input
                    memo[GROUP[m]] = (_gram(x, xh), _gram(xh))
                target, g = refit_target(w, ws, *memo[GROUP[m]], damp)
            (b, a), sv = whitened_factors(target, g, ranks[m][p])
            svals[m].append(sv)
            factors[m].append((b, a) if ranks[m][p] > 0 else None)
            return (ws + b @ a).to(source.dtype)

        if method == "whitened":
            for m in arch.linear_modules:
                fit(m, orig.weights[m], orig.weights[m])
            norms["input_norm"].append(orig.input_norm)
            norms["post_attn_norm"].append(orig.post_attn_norm)
            bar.update()
            continue
        with torch.no_grad():
            h_next, hh_next = fitted_layer(lm, orig, conv, h, hh, fit)
        if polish is not None and method == "sequential" and polish.steps > 0:
            left = polish.seconds - (time.perf_counter() - start)
            budget = max(0.0, left) / (num_layers - p)
            polished = _polish_position(
                lm, conv, shared, factors, p, k, hh, h_next, n, s, polish, budget
            )
            if polished is not None:
                conv, hh_next = polished
        norms["input_norm"].append(conv.input_norm.detach())
        norms["post_attn_norm"].append(conv.post_attn_norm.detach())
        h, hh = h_next, hh_next
        bar.update()
    bar.close()
    return DataAwareResult(factors, svals, norms, energy)


def _polish_position(
    lm: LayerMath,
    conv: PositionWeights,
    shared: dict[str, torch.Tensor],
    factors: dict[str, list[Factors | None]],
    p: int,
    k: int,
    hh: torch.Tensor,
    target: torch.Tensor,
    n: int,
    s: int,
    polish: Polish,
    seconds: float,
) -> tuple[PositionWeights, torch.Tensor] | None:
    """Adam on position p's factors and norms: the converted layer on its own input ``hh``
    against the original layer's output ``target`` (relative MSE), within ``seconds``.
    Returns the polished weights and output, or None when no step fitted in the bounds."""
    dtype = hh.dtype
    params: dict[str, torch.Tensor] = {}
    for m, fs in factors.items():
        if fs[p] is not None:
            b, a = fs[p]
            params[f"b.{m}"] = b.to(dtype).clone().requires_grad_(True)
            params[f"a.{m}"] = a.to(dtype).clone().requires_grad_(True)
    params["input_norm"] = conv.input_norm.clone().requires_grad_(True)
    params["post_attn_norm"] = conv.post_attn_norm.clone().requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=polish.lr)
    gen = torch.Generator().manual_seed(p)
    rows = min(polish.batch_windows, n)
    # the first rows·s positions are arange(s) repeated: reuse the real cos/sin
    local = LayerMath(lm.arch, s, rows, tables=lm.rows(rows * s))

    def weights() -> PositionWeights:
        w = {}
        for m in conv.weights:
            base = shared[m][k].to(dtype)
            w[m] = base + params[f"b.{m}"] @ params[f"a.{m}"] if f"b.{m}" in params else base
        return replace(
            conv,
            weights=w,
            input_norm=params["input_norm"],
            post_attn_norm=params["post_attn_norm"],
        )

    hv, tv = hh.view(n, s, -1), target.view(n, s, -1)
    scale = float(target.pow(2).mean())
    deadline = time.perf_counter() + seconds
    steps = 0
    for _ in range(polish.steps):
        if time.perf_counter() >= deadline:
            break
        steps += 1
        idx = torch.randperm(n, generator=gen)[:rows]
        out = local.forward(weights(), hv[idx].reshape(rows * s, -1))
        loss = (out - tv[idx].reshape(rows * s, -1)).pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    if steps == 0:
        return None
    for m in factors:
        if f"b.{m}" in params:
            factors[m][p] = (params[f"b.{m}"].detach().double(), params[f"a.{m}"].detach().double())
    with torch.no_grad():
        final = weights()
        final = replace(
            final,
            weights={m: w.detach() for m, w in final.weights.items()},
            input_norm=final.input_norm.detach(),
            post_attn_norm=final.post_attn_norm.detach(),
        )
        return final, lm.forward(final, hh)
