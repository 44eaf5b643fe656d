"""Depth-wise batching timed under forced exit schedules: does the engine turn exits into speed?

Each token's exit depth is drawn from given per-depth weights by (request, position)
(``EngineConfig.forced_exit_weights``), so vanilla, sequence-wise and depth-wise batching run on
the same real kernels, K/V fills and scheduling whatever the exits' quality. The ideal speed-up
over exits-off is B / mean loops per token; the table reports achieved / ideal beside TPOT
percentiles (holds in aligned mode cost latency). Prompt tokens run every loop whatever the
exits, so prompts are short by default (the run is decode-bound); "rows run" is the measured
work ratio, prefill included. "bound" is what exits could buy if only the block passes shrank
(by that work ratio) and the rest of the exits-off run's time — LM head, sampling, step
building, scheduling — stayed as it was: the exits-off run's measured block seconds and the
rest, B / loops corrected for the work that does not loop (fills of skipped depths are extra
work the bound leaves out). Weights: random SmolLM2-shaped models (speed
only), a compact B = 3 rank-64 model in mixed mode and the exact-shaped dense model aligned.

    python -m benchmarks.forced_exits --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
import time
from pathlib import Path

import torch

from benchmarks.gemm_peak import DTYPES
from benchmarks.throughput import git_commit, machine_name, make_prompts, random_models
from model.recursive import RecursiveLM
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams

SCHEDULES = {"uniform (mean 2.0)": (1.0, 1.0, 1.0), "last-heavy (mean 2.5)": (0.1, 0.3, 0.6)}


def make_engine(
    model: RecursiveLM,
    batching: str,
    weights: tuple[float, ...],
    conc: int,
    out_len: int,
    seed: int,
    prompt_len: tuple[int, int],
) -> Engine:
    """An engine under the forced schedule ``weights`` with 2·conc greedy requests queued."""
    cfg = EngineConfig(
        batching=batching,
        forced_exit_weights=weights,
        max_num_seqs=conc,
        max_num_batched_tokens=max(256, 4 * conc),
        num_blocks=4096,
        max_model_len=4096,
    )
    engine = Engine(model, cfg)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    prompts = make_prompts(conc * 2, prompt_len, seed, model.config.arch.vocab_size, None)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    return engine


def run(
    model: RecursiveLM,
    batching: str,
    weights: tuple[float, ...],
    conc: int,
    out_len: int,
    seed: int,
    prompt_len: tuple[int, int],
) -> dict:
    engine = make_engine(model, batching, weights, conc, out_len, seed, prompt_len)
    last_emit: dict[str, float] = {}
    gaps: list[float] = []
    depths: list[int] = []
    rows = 0
    phases: dict[str, float] = {}
    start = time.perf_counter()
    while engine.has_work:
        outs, stats = engine.step()
        rows += sum(stats.rows_per_depth)
        for phase, sec in stats.phase_seconds.items():
            phases[phase] = phases.get(phase, 0.0) + sec
        now = time.perf_counter()
        for o in outs:
            if o.request_id in last_emit:
                gaps.append(now - last_emit[o.request_id])
            last_emit[o.request_id] = now
            depths.extend(o.exit_depths)
    seconds = time.perf_counter() - start
    gaps.sort()
    return {
        "tok_per_s": len(depths) / seconds,
        "mean_loops": statistics.fmean(d + 1 for d in depths),
        "rows": rows,
        "seconds": seconds,
        "block_s": phases.get("block", 0.0),
        "end_of_step_s": phases.get("head+exit+sample+fill", 0.0),
        "tpot_p50_ms": 1000 * gaps[len(gaps) // 2],
        "tpot_p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up over exits-off per (model, batching, schedule): achieved beside ideal and bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if "speedup" in r]
    labels = [f"{r['model']}\n{r['batching']}\n{r['schedule']}" for r in runs]
    xs = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(runs)), 4.5))
    ax.bar([x - 0.27 for x in xs], [r["ideal"] for r in runs], 0.27, label="ideal (B / loops)")
    ax.bar(xs, [r["bound"] for r in runs], 0.27, label="bound (only the block passes shrink)")
    ax.bar([x + 0.27 for x in xs], [r["speedup"] for r in runs], 0.27, label="achieved")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("tok/s vs exits off")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--concurrency", type=int, nargs="+", default=[32])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--prompt-len",
        type=int,
        nargs=2,
        default=(8, 24),
        metavar=("MIN", "MAX"),
        help="prompt tokens run every loop whatever the exits: short prompts keep the run "
        "decode-bound, where the ideal B / mean loops applies",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/forced_exits"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = random_models()
    for m in models.values():
        m.to(dtype=DTYPES[args.dtype])
        prepare_for_serving(m)
    rows = []
    for c in args.concurrency:
        plen = tuple(args.prompt_len)
        run(models["vanilla"], "sequence", (), 4, 4, 0, plen)  # warm-up
        base = run(models["vanilla"], "sequence", (), c, args.output_len, c, plen)
        rows.append({"model": "vanilla", "batching": "sequence", "schedule": "—", "c": c, **base})
        for name in ("rrt3-r64", "rrt3-exact"):
            off = {
                b: run(models[name], b, (), c, args.output_len, c, plen)
                for b in ("sequence", "depth")
            }
            for b, r in off.items():
                rows.append({"model": name, "batching": b, "schedule": "exits off", "c": c, **r})
            for label, weights in SCHEDULES.items():
                for b in ("sequence", "depth"):
                    r = run(models[name], b, weights, c, args.output_len, c, plen)
                    ideal = 3 / r["mean_loops"]
                    speedup = r["tok_per_s"] / off[b]["tok_per_s"]
                    work_ratio = off[b]["rows"] / r["rows"]
                    o = off[b]
                    bound = o["seconds"] / (o["block_s"] / work_ratio + o["seconds"] - o["block_s"])
                    rows.append(
                        {
                            "model": name,
                            "batching": b,
                            "schedule": label,
                            "c": c,
                            **r,
                            "speedup": speedup,
                            "ideal": ideal,
                            "achieved_of_ideal": speedup / ideal,
                            "work_ratio": work_ratio,
                            "bound": bound,
                            "achieved_of_bound": speedup / bound,
                        }
                    )
    header = (
        f"### Forced exit schedules — {machine_name()}, {time.strftime('%Y-%m-%d')}, "
        f"commit {git_commit()}, random SmolLM2-shaped weights, {args.dtype}, "
        f"{args.prompt_len[0]}-{args.prompt_len[1]}-token prompts, "
        f"{args.output_len} output tokens/request, 2·c requests"
    )
    lines = [
        header,
        "",
        "| model | batching | schedule | c | tok/s | loops/tok | vs exits-off "
        "| ideal | achieved/ideal | rows run: off / on | bound | achieved/bound "
        "| block / end-of-step s | TPOT p50 ms | TPOT p99 ms |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        extra = (
            f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['achieved_of_ideal']:.0%} "
            f"| {r['work_ratio']:.2f}x | {r['bound']:.2f}x | {r['achieved_of_bound']:.0%}"
            if "speedup" in r
            else "— | — | — | — | — | —"
        )
        lines.append(
            f"| {r['model']} | {r['batching']} | {r['schedule']} | {r['c']} | {r['tok_per_s']:.1f} "
            f"| {r['mean_loops']:.2f} | {extra} | {r['block_s']:.1f} / {r['end_of_step_s']:.1f} "
            f"| {r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forced_exits.md").write_text(table)
    (args.out / "forced_exits.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out / "forced_exits.png", header.removeprefix("### "))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
