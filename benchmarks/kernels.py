"""Kernel benchmark: fused LoRA linear vs the base matmul and unfused LoRA; paged decode vs SDPA.

Run ``python -m benchmarks.kernels [--quick] [--out DIR]``. On a GPU it times every provider
(Triton kernels, torch/cuBLAS base, PEFT-style unfused LoRA, per-depth dense weights) in bf16
with ``triton.testing.do_bench``; on a CPU it times the torch path in fp32 (``--quick`` keeps
that short). Writes ``kernels.csv``, ``kernels.json``, ``kernels.png`` and ``kernels.md`` (the
summary table, ready for RESULTS.md) to the output directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from loopserve_kernels import PagedAttentionMetadata, paged_attention
from loopserve_kernels.dense_lora import dense_per_depth_linear, materialise_dense, prefer_dense
from loopserve_kernels.lora_linear import lora_linear

MODELS = {  # name: (hidden, mlp, q_heads, kv_heads, head_dim)
    "smollm2-135m": (576, 1536, 9, 3, 64),
    "2b-class": (2048, 16384, 32, 8, 64),
}
ROWS = (1, 8, 32, 128, 512, 2048)
RANKS = (64, 128, 256)
MIXES = ("1", "2", "3", "3x")  # depths in the batch, sorted by depth; "3x": shuffled ids
NUM_DEPTHS = 3
NOTE = (
    "overhead = fused / base matmul; speed-up = unfused (PEFT-style) / fused; mix = depths "
    "present (sorted segments), 3x = 3 depths with shuffled row ids."
)


@dataclass(frozen=True)
class LinearResult:
    """One LoRA-linear case: times in ms per provider (NaN when not run) and derived rates."""

    model: str
    layer: str
    out_features: int
    in_features: int
    rank: int
    rows: int
    mix: str
    base_ms: float
    base_triton_ms: float
    fused_ms: float
    unfused_ms: float
    dense_ms: float
    fused_tflops: float
    fused_gbps: float
    overhead: float
    speedup: float
    prefer_dense: bool


@dataclass(frozen=True)
class AttentionResult:
    """Paged decode attention vs SDPA on the same K/V gathered contiguously."""

    model: str
    seqs: int
    context: int
    block_size: int
    paged_ms: float
    sdpa_ms: float
    paged_gbps: float
    ratio: float


def machine_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo, with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return f"{model or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def commit_hash() -> str:
    """Short commit of the working tree (``+dirty`` if modified), or "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", "loopserve_kernels", "benchmarks").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median milliseconds per call: ``do_bench`` on CUDA, a synchronous timed loop on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def depth_ids(rows: int, mix: str, device: torch.device) -> torch.Tensor:
    """Per-row depth ids: ``mix`` depths in equal sorted segments, or shuffled for "3x"."""
    present = int(mix[0])
    ids = torch.arange(rows) * present // max(rows, 1)
    if mix.endswith("x"):
        ids = ids[torch.randperm(rows, generator=torch.Generator().manual_seed(rows))]
    return ids.to(device)


def unfused_lora(
    x: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    segments: list[tuple[int, torch.Tensor]],
) -> torch.Tensor:
    """What a PEFT user runs: base linear, then per adapter ``y[idx] += B(A(x[idx]))``."""
    y = x @ w.T
    for d, idx in segments:
        y[idx] += (x[idx] @ a[d].T) @ b[d].T
    return y


@lru_cache(maxsize=1)
def make_weights(
    n: int, k: int, rank: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """W, A, B and the per-depth dense weights, made on the device once per (layer, rank)."""
    g = torch.Generator(device).manual_seed(n + k + rank)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    w = rand(n, k, scale=k**-0.5)
    a = rand(NUM_DEPTHS, rank, k, scale=k**-0.5)
    b = rand(NUM_DEPTHS, n, rank, scale=rank**-0.5)
    return w, a, b, materialise_dense(w, a, b)


def bench_linear(
    model: str,
    layer: str,
    n: int,
    k: int,
    rank: int,
    rows: int,
    mix: str,
    device: torch.device,
    dtype: torch.dtype,
    budget_s: float,
) -> LinearResult:
    """Time all providers for one shape; the rates are the fused provider's."""
    w, a, b, dense = make_weights(n, k, rank, device, dtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(device, dtype)
    depth = depth_ids(rows, mix, device)
    segments = [(d, (depth == d).nonzero().squeeze(1)) for d in range(NUM_DEPTHS)]
    segments = [(d, idx) for d, idx in segments if idx.numel()]

    def run(fn: Callable[[], object]) -> float:
        return time_ms(fn, device, budget_s)

    base = run(lambda: x @ w.T)
    fused = run(lambda: lora_linear(x, w, a, b, depth))
    unfused = run(lambda: unfused_lora(x, w, a, b, segments))
    dense_ms = run(lambda: dense_per_depth_linear(x, dense, depth))
    base_triton = math.nan
    if device.type == "cuda":
        from loopserve_kernels.lora_linear_triton import lora_matmul

        base_triton = run(lambda: lora_matmul(x, w, None, None, depth))
    present = len(segments)
    flops = 2 * rows * (n * k + rank * (n + k))
    nbytes = x.element_size() * (rows * (k + n) + n * k + present * rank * (n + k))
    return LinearResult(
        model, layer, n, k, rank, rows, mix, base, base_triton, fused, unfused, dense_ms,
        flops / fused / 1e9, nbytes / fused / 1e6, fused / base, unfused / fused,
        prefer_dense(n, k, rank),
    )  # fmt: skip


def bench_attention(
    model: str, seqs: int, context: int, device: torch.device, dtype: torch.dtype, budget_s: float
) -> AttentionResult:
    """Decode (one query per sequence) over ``context`` cached tokens per sequence."""
    _, _, hq, hkv, dim = MODELS[model]
    block_size = 16
    g = torch.Generator().manual_seed(seqs + context)
    blocks = context // block_size
    num_blocks = seqs * blocks
    k_cache = torch.randn(num_blocks, block_size, hkv, dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, dim, generator=g).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=g).view(seqs, blocks).int().to(device)
    meta = PagedAttentionMetadata(
        block_tables=tables,
        context_lens=torch.full((seqs,), context, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(seqs + 1, dtype=torch.int32, device=device),
        max_query_len=1,
        max_context_len=context,
    )
    q = torch.randn(seqs, hq, dim, generator=g).to(device, dtype)
    scale = dim**-0.5
    # the same K/V gathered contiguously: [S, H, L, D], GQA heads repeated for SDPA
    kg, vg = (
        c[tables.long()].flatten(1, 2).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
        for c in (k_cache, v_cache)
    )
    qg = q.unsqueeze(2)  # [S, Hq, 1, D]
    paged = time_ms(lambda: paged_attention(q, k_cache, v_cache, meta, scale), device, budget_s)
    sdpa = time_ms(
        lambda: F.scaled_dot_product_attention(qg, kg, vg, scale=scale), device, budget_s
    )
    nbytes = 2 * k_cache.numel() * k_cache.element_size()
    return AttentionResult(
        model, seqs, context, block_size, paged, sdpa, nbytes / paged / 1e6, paged / sdpa
    )


def linear_cases(quick: bool) -> list[tuple[str, str, int, int, int, int, str]]:
    """(model, layer, out, in, rank, rows, mix): every rank at 3 sorted depths, all mixes at r64."""
    cases = []
    models = ["smollm2-135m"] if quick else list(MODELS)
    for model in models:
        hidden, mlp = MODELS[model][:2]
        layers = {"q_proj": (hidden, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}
        if quick:
            layers = {"q_proj": layers["q_proj"], "up_proj": layers["up_proj"]}
        for layer, (n, k) in layers.items():
            for rank in (64,) if quick else RANKS:
                for rows in (1, 32, 512) if quick else ROWS:
                    for mix in ("1", "3", "3x") if quick else MIXES:
                        if rank == 64 or mix == "3":
                            cases.append((model, layer, n, k, rank, rows, mix))
    return cases


def fmt(v: float, digits: int = 3) -> str:
    return "–" if math.isnan(v) else f"{v:.{digits}g}"


def markdown(
    header: str, linear: list[LinearResult], attention: list[AttentionResult], gpu: bool
) -> str:
    """The summary tables (also printed last) in GitHub markdown."""
    lines = [header, ""]
    lines.append(
        "| model | layer | out×in | rank | rows | mix | base ms | "
        + ("triton base ms | " if gpu else "")
        + "fused ms | unfused ms | dense ms | fused TFLOP/s | fused GB/s | overhead | speed-up |"
    )
    lines.append("|" + "---|" * (15 if gpu else 14))
    for r in linear:
        cells = [r.model, r.layer, f"{r.out_features}×{r.in_features}", str(r.rank), str(r.rows)]
        cells += [r.mix, fmt(r.base_ms)] + ([fmt(r.base_triton_ms)] if gpu else [])
        cells += [fmt(r.fused_ms), fmt(r.unfused_ms), fmt(r.dense_ms), fmt(r.fused_tflops)]
        cells += [fmt(r.fused_gbps), f"{r.overhead:.2f}×", f"{r.speedup:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | seqs | context | block | paged ms | SDPA ms | paged GB/s | paged/SDPA |",
    ]
    lines.append("|" + "---|" * 8)
    for a in attention:
        cells = [a.model, str(a.seqs), str(a.context), str(a.block_size), fmt(a.paged_ms)]
        cells += [fmt(a.sdpa_ms), fmt(a.paged_gbps), f"{a.ratio:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTE, "", targets(linear, attention)]
    return "\n".join(lines) + "\n"


def targets(linear: list[LinearResult], attention: list[AttentionResult]) -> str:
    """The issue's done-when figures: worst case over rank 64, ≥ 128 rows, sorted depth mixes."""
    sel = [r for r in linear if r.rank == 64 and r.rows >= 128 and not r.mix.endswith("x")]
    if not sel or not attention:
        return "targets: no cases"
    worst_overhead = max(r.overhead for r in sel)
    worst_speedup = min(r.speedup for r in sel)
    worst_attn = max(a.ratio for a in attention)
    return (
        f"targets (rank 64, rows ≥ 128): fused/base ≤ {worst_overhead:.2f}× (goal 1.2×), "
        f"unfused/fused ≥ {worst_speedup:.2f}× (goal 1.5×); "
        f"paged decode/SDPA ≤ {worst_attn:.2f}× (goal 1.5×)"
    )


def plot(linear: list[LinearResult], path: Path) -> None:
    """Overhead over base and speed-up over unfused vs rows, one line per (layer, rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r.model, r.layer, r.rank) for r in linear if r.mix == "3"})
    for key in keys:
        chosen = [r for r in linear if r.mix == "3" and (r.model, r.layer, r.rank) == key]
        pts = sorted((r.rows, r.overhead, r.speedup) for r in chosen)
        label = f"{key[0]} {key[1]} r{key[2]}"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    for ax, title in zip(axes, ("fused / base matmul", "unfused / fused"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows")
        ax.set_title(title + " (3 depths)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small case set (CPU runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output dir")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    budget_s = 0.2 if args.quick else 0.5
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    header = (
        f"**{machine_name(device)}** · torch {torch.__version__} · {str(dtype).split('.')[-1]} · "
        f"{'all providers (Triton)' if gpu else 'torch path'} · commit {commit_hash()} · "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(header, flush=True)
    linear = []
    for case in linear_cases(args.quick):
        linear.append(bench_linear(*case, device, dtype, budget_s))
        r = linear[-1]
        case_name = f"{r.model} {r.layer} r{r.rank} rows={r.rows} mix={r.mix}"
        print(f"{case_name}: {r.overhead:.2f}× base, {r.speedup:.2f}× vs unfused", flush=True)
    attention = []
    for model in ["smollm2-135m"] if args.quick else list(MODELS):
        for seqs, context in ((8, 512), (64, 2048)) if not args.quick else ((8, 512),):
            attention.append(bench_attention(model, seqs, context, device, dtype, budget_s))
    rows = [asdict(r) for r in linear]
    with (args.out / "kernels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    payload = {"machine": header, "linear": rows, "attention": [asdict(a) for a in attention]}
    (args.out / "kernels.json").write_text(json.dumps(payload, indent=1))
    plot(linear, args.out / "kernels.png")
    table = markdown(header, linear, attention, gpu)
    (args.out / "kernels.md").write_text(table)
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main()
