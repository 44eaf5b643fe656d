"""What a depth-wise step's block pass costs by its rows and depth segments, exits off and under
a forced uniform exit schedule (the forced-exit benchmark's engine settings, c = 32).

A step whose rows sit at several loop depths runs the shared GEMM once but each depth's
low-rank deltas (compact models) or dense weights (the exact model) over its own rows; this
splits the block-phase time by (rows, segments) so that cost shows apart from the row count.

    python -m benchmarks.depth_segments --threads 2 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.forced_exits import make_engine
from benchmarks.gemm_peak import DTYPES
from benchmarks.throughput import git_commit, machine_name, random_models
from model.recursive import RecursiveLM
from model.serving import prepare_for_serving

CONCURRENCY, OUTPUT_LEN, PROMPT_LEN = 32, 64, (8, 24)


def run(model: RecursiveLM, weights: tuple[float, ...]) -> dict:
    engine = make_engine(model, "depth", weights, CONCURRENCY, OUTPUT_LEN, CONCURRENCY, PROMPT_LEN)
    by_shape: dict[tuple[int, int], list[float]] = defaultdict(list)
    rows = steps = 0
    block = 0.0
    while engine.has_work:
        _, stats = engine.step()
        n = sum(stats.rows_per_depth)
        segments = sum(1 for r in stats.rows_per_depth if r)
        seconds = stats.phase_seconds.get("block", 0.0)
        by_shape[(min(n, 64) // 8 * 8, segments)].append(seconds)
        rows, steps, block = rows + n, steps + 1, block + seconds
    return {
        "steps": steps,
        "rows": rows,
        "block_s": block,
        "shapes": [
            {"rows": r, "segments": g, "steps": len(v), "block_ms": 1000 * statistics.fmean(v)}
            for (r, g), v in sorted(by_shape.items())
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/depth_segments"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = random_models()
    runs = []
    for name in ("rrt3-r64", "rrt3-exact"):
        model = models[name].to(dtype=DTYPES[args.dtype])
        prepare_for_serving(model)
        for label, weights in (("exits off", ()), ("uniform (mean 2.0)", (1.0, 1.0, 1.0))):
            runs.append({"model": name, "schedule": label, **run(model, weights)})
    lines = [
        f"### Block pass by rows and depth segments — {machine_name()}, "
        f"{time.strftime('%Y-%m-%d')}, commit {git_commit()}, random SmolLM2-shaped weights, "
        f"{args.dtype}, depth-wise, c = {CONCURRENCY}, {PROMPT_LEN[0]}-{PROMPT_LEN[1]}-token "
        f"prompts, {OUTPUT_LEN} output tokens",
        "",
        "| model | schedule | steps | rows | block s | rows a step (bucket of 8) | segments "
        "| steps there | block ms a step |",
        "|" + "---|" * 9,
    ]
    for r in runs:
        for shape in r["shapes"]:
            if shape["steps"] > 5:  # the few tail steps say nothing
                lines.append(
                    f"| {r['model']} | {r['schedule']} | {r['steps']} | {r['rows']} "
                    f"| {r['block_s']:.2f} | {shape['rows']} | {shape['segments']} "
                    f"| {shape['steps']} | {shape['block_ms']:.1f} |"
                )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "depth_segments.md").write_text(table)
    (args.out / "depth_segments.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
