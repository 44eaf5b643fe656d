"""A server beside busy neighbours: does a CPU-bound neighbour slow it in proportion, or tenfold?

For each thread setting and OpenMP wait policy, starts ``loopserve serve``, then runs the same
short load quiet and beside 1..N neighbours (each a Python busy loop, bounded by
``--neighbour-seconds``, started just before the load and killed right after it). A neighbour
takes a core; in proportion, a server on ``t`` threads and ``c`` cores beside ``n`` neighbours
keeps about ``min(1, c / (t + n))`` of its speed. OpenMP teams are where it goes wrong: each of
a step's few hundred parallel regions ends at a barrier that waits for the team's slowest
thread, and a thread whose core a neighbour holds is slow by whole scheduler slices.

    python -m benchmarks.shared_machine --threads 1 2 \\
        --wait-policy default spin=300000 PASSIVE --neighbours 0 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.client.cli import add_load_arguments, build_requests, endpoint_for
from benchmarks.client.datasets import load_tokenizer
from benchmarks.client.metrics import compute_metrics
from benchmarks.client.runner import LoadConfig, run_load
from benchmarks.server_process import ServerProcess, free_port
from benchmarks.throughput import git_commit, machine_name

BUSY = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass"
)


def _neighbours(n: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", BUSY, str(seconds)]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def _policy_env(policy: str) -> dict[str, str]:
    """``default`` (the server's own: ``loopserve.openmp``), ``ACTIVE`` / ``PASSIVE``
    (OMP_WAIT_POLICY), or ``spin=N`` (GOMP_SPINCOUNT=N: spin N rounds, then sleep; libgomp's
    own default is 300000)."""
    if policy == "default":
        return {}
    if policy.startswith("spin="):
        return {"GOMP_SPINCOUNT": policy.removeprefix("spin=")}
    return {"OMP_WAIT_POLICY": policy}


def measure(args: argparse.Namespace, threads: int, policy: str, log: Path) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "loopserve.cli", "serve", "--model", args.model),
        *("--batching", "sequence", "--port", str(port), "--shutdown-grace", "1"),
        *("--threads", str(threads), "--dtype", args.dtype),
    ]
    env_policy = _policy_env(policy)
    saved = {k: os.environ.get(k) for k in env_policy}
    os.environ.update(env_policy)  # the server subprocess inherits it
    try:
        server = ServerProcess(command, url, log)
        with server:
            server.wait_ready(args.startup_timeout)
            tokenizer = load_tokenizer(args.model)
            requests = build_requests(args, tokenizer)
            endpoint = endpoint_for(args, url, model=None)
            load = LoadConfig(max_concurrency=args.concurrency, max_duration=args.max_duration)
            asyncio.run(run_load(endpoint, requests[:2], load, tokenizer))  # warm-up
            rows = []
            for n in args.neighbours:
                procs = _neighbours(n, args.neighbour_seconds)
                try:
                    outcome = asyncio.run(run_load(endpoint, requests, load, tokenizer))
                finally:
                    _stop(procs)
                m = compute_metrics(outcome.results, outcome.duration, [50.0, 99.0])
                row = {
                    "threads": threads,
                    "wait_policy": policy,
                    "neighbours": n,
                    "completed": m.completed,
                    "failed": m.failed,
                    "output_throughput": m.output_throughput,
                    "tpot_p50_ms": m.latency["tpot"].percentiles[50.0],
                    "tpot_p99_ms": m.latency["tpot"].percentiles[99.0],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
                time.sleep(1.0)  # let the neighbours' cores go quiet
            return rows
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def markdown(rows: list[dict[str, Any]], header: str, cores: int) -> str:
    quiet = {
        (r["threads"], r["wait_policy"]): r["output_throughput"]
        for r in rows
        if r["neighbours"] == 0
    }
    lines = [
        header,
        "",
        "| threads | OpenMP waiting | neighbours | ok | failed | output tok/s | of quiet "
        "| in proportion | TPOT p50 ms | TPOT p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["output_throughput"] / quiet[(r["threads"], r["wait_policy"])]
        fair = min(1.0, cores / (r["threads"] + r["neighbours"]))
        lines.append(
            f"| {r['threads']} | {r['wait_policy']} | {r['neighbours']} | {r['completed']} | "
            f"{r['failed']} | {r['output_throughput']:.1f} | {share:.2f} | {fair:.2f} | "
            f"{r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["threads"], r["wait_policy"]) for r in rows}):
        pts = [r for r in rows if (r["threads"], r["wait_policy"]) == key]
        ax.plot(
            [r["neighbours"] for r in pts],
            [r["output_throughput"] for r in pts],
            marker="o",
            label=f"{key[0]} thread(s), waiting: {key[1]}",
        )
    ax.set_xlabel("busy neighbour processes")
    ax.set_ylabel("output tok/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory (default: the pulled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--wait-policy",
        nargs="+",
        default=["default", "spin=300000", "PASSIVE"],
        help="default | ACTIVE | PASSIVE | spin=N (GOMP_SPINCOUNT)",
    )
    p.add_argument("--neighbours", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--neighbour-seconds", type=float, default=120.0, help="a neighbour's life cap")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shared_machine"))
    add_load_arguments(p)
    p.set_defaults(num_prompts=8, input_len=64, output_len=32, ignore_eos=True, max_duration=90.0)
    args = p.parse_args(argv)
    if args.model is None:
        from model.pull import source_model_dir

        args.model = str(source_model_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        row
        for threads in args.threads
        for policy in args.wait_policy
        for row in measure(args, threads, policy, args.out / f"serve_t{threads}_{policy}.log")
    ]
    cores = len(os.sched_getaffinity(0))
    header = (
        f"### Beside busy neighbours — {machine_name()} ({cores} cores), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}, "
        f"{args.dtype}, {args.num_prompts} requests x ({args.input_len} + {args.output_len}) "
        f"tokens at c = {args.concurrency}"
    )
    table = markdown(rows, header, cores)
    (args.out / "shared_machine.md").write_text(table)
    (args.out / "shared_machine.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "shared_machine.png", header.removeprefix("### "))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
