"""``loopserve bench compare``: the same concurrency sweep against loopserve vanilla +
sequence-wise batching, loopserve recursive + depth-wise batching, and any peer server,
one server at a time, with greedy agreement against the vanilla server beside the speed.

Writes ``compare.md`` (one side-by-side table and the commands that produced it),
``compare.png`` (output tok/s and TPOT p50/p99 vs concurrency), ``compare.json`` and each
started server's log to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.client.cli import add_load_arguments, build_requests, endpoint_for
from benchmarks.client.datasets import BenchError, SampleRequest, load_tokenizer
from benchmarks.client.metrics import BenchmarkMetrics, compute_metrics
from benchmarks.client.runner import LoadConfig, run_load
from benchmarks.client.streaming import Endpoint
from benchmarks.compare_report import agreement, plot_sweep, sweep_table
from benchmarks.gemm_peak import gemm_peak, token_flops
from benchmarks.server_process import ServerProcess, free_port
from model.config import ArchConfig

VANILLA = "loopserve-vanilla-seq"
RECURSIVE = "loopserve-rrt-depth"
QUALITY_CONCURRENCY = 4


@dataclass(frozen=True)
class Target:
    """A server to measure: at ``url``, started by ``command`` first where one is given."""

    name: str
    url: str
    command: list[str] | None = None


@dataclass
class TargetResult:
    """A server's sweep rows (one per concurrency) and its greedy outputs for agreement."""

    name: str
    url: str
    command: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    quality_texts: list[str] = field(default_factory=list)


def loopserve_target(name: str, model: str, batching: str, args: argparse.Namespace) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "loopserve.cli", "serve", "--model", model]
    command += ["--batching", batching, "--port", str(port), "--shutdown-grace", "1"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += ["--dtype", args.dtype]
    command += [a for extra in args.serve_arg for a in shlex.split(extra)]
    return Target(name, f"http://127.0.0.1:{port}", command)


def _pairs(specs: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise BenchError(f"{flag} wants NAME=VALUE, got {spec!r}")
        pairs[name] = value
    return pairs


def targets_from(args: argparse.Namespace) -> list[Target]:
    targets = [
        loopserve_target(VANILLA, args.vanilla_model, "sequence", args),
        loopserve_target(RECURSIVE, args.recursive_model, "depth", args),
    ]
    urls, commands = _pairs(args.peer, "--peer"), _pairs(args.peer_command, "--peer-command")
    if missing := set(commands) - set(urls):
        raise BenchError(f"--peer-command for {sorted(missing)} needs --peer NAME=URL too")
    for name, url in urls.items():
        command = shlex.split(commands[name]) if name in commands else None
        targets.append(Target(name, url, command))
    return targets


def measure(
    target: Target,
    args: argparse.Namespace,
    requests: list[SampleRequest],
    tokenizer: Any,
    log_dir: Path,
) -> TargetResult:
    """Start the target if it has a command, then run the quality pass and the sweep."""
    result = TargetResult(target.name, target.url, shlex.join(target.command or []) or None)
    log = log_dir / f"{target.name}.log"
    server = ServerProcess(target.command, target.url, log) if target.command else None
    with server or nullcontext():
        if server is not None:
            server.wait_ready(args.startup_timeout)
        endpoint = endpoint_for(args, target.url, model=None)
        # first, so it also warms the server up (first-call allocations, lazy init)
        result.quality_texts = _greedy_texts(endpoint, requests, args, tokenizer)
        for c in args.concurrency:
            load = LoadConfig(
                max_concurrency=c,
                max_duration=args.max_duration,
                seed=args.seed,
                progress=not args.disable_tqdm,
            )
            sent = requests[: max(args.num_prompts, args.prompts_per_slot * c)]
            outcome = asyncio.run(run_load(endpoint, sent, load, tokenizer))
            m = compute_metrics(outcome.results, outcome.duration, [50.0, 99.0])
            result.rows.append({"concurrency": c, **_row(m)})
            print(
                f"{target.name} c={c}: {m.output_throughput:.1f} output tok/s, "
                f"{m.completed} ok, {m.failed} failed",
                flush=True,
            )
    return result


def _greedy_texts(
    endpoint: Endpoint, requests: list[SampleRequest], args: argparse.Namespace, tokenizer: Any
) -> list[str]:
    """Temperature-0 outputs on the first ``--quality-prompts`` prompts ("" where one failed)."""
    prompts = [replace(r, output_len=args.quality_len) for r in requests[: args.quality_prompts]]
    load = LoadConfig(max_concurrency=QUALITY_CONCURRENCY, progress=False)
    greedy = replace(endpoint, temperature=0.0)
    outcome = asyncio.run(run_load(greedy, prompts, load, tokenizer))
    return [r.generated_text if r.success else "" for r in outcome.results]


def _row(m: BenchmarkMetrics) -> dict[str, Any]:
    lat = m.latency
    return {
        "completed": m.completed,
        "failed": m.failed,
        "errors": m.errors,
        "duration_s": m.duration,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "ttft_p50_ms": lat["ttft"].percentiles[50.0],
        "tpot_p50_ms": lat["tpot"].percentiles[50.0],
        "tpot_p99_ms": lat["tpot"].percentiles[99.0],
        "itl_p50_ms": lat["itl"].percentiles[50.0],
    }


def run_compare(args: argparse.Namespace) -> int:
    if args.vanilla_model is None:
        from model.pull import source_model_dir

        args.vanilla_model = str(source_model_dir())
    targets = targets_from(args)  # bad peer specs fail before anything is loaded
    tokenizer = load_tokenizer(args.tokenizer or args.vanilla_model)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # the same prompts for every server; each concurrency sends the first of them it needs
    most = max(args.num_prompts, args.prompts_per_slot * max(args.concurrency))
    requests = build_requests(argparse.Namespace(**{**vars(args), "num_prompts": most}), tokenizer)
    peak = gemm_peak(args.dtype, args.threads)  # this machine, now, before the servers run
    print(f"GEMM peak ({args.dtype}, {args.threads or 'default'} threads): {peak:.1f} GFLOP/s")
    results = [measure(t, args, requests, tokenizer, out / "logs") for t in targets]
    prompt_flops, output_flops = token_flops(
        ArchConfig.from_hf(json.loads((Path(args.vanilla_model) / "config.json").read_text()))
    )
    reference = results[0].quality_texts
    for r in results:
        for row in r.rows:
            row.update(agreement(reference, r.quality_texts, tokenizer))
            prompt_tps = row["total_token_throughput"] - row["output_throughput"]
            gflops = (prompt_tps * prompt_flops + row["output_throughput"] * output_flops) / 1e9
            row.update(gflops=gflops, peak_share=gflops / peak)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench")}
    settings["gemm_peak_gflops"] = peak
    (out / "compare.md").write_text(sweep_table(results, json.dumps(settings)))
    plot_sweep(results, out / "compare.png")
    report = {"settings": settings, "servers": [asdict(r) for r in results]}
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print((out / "compare.md").read_text())
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="sweep loopserve (vanilla, recursive) and peers side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = p.add_argument
    opt(
        "--vanilla-model",
        help="vanilla checkpoint served sequence-wise (default: the pulled SmolLM2-135M-Instruct)",
    )
    opt(
        "--recursive-model",
        default="default",
        help="recursive checkpoint served depth-wise (default: the default model)",
    )
    opt("--tokenizer", help="tokenizer for prompts and agreement (default: the vanilla model's)")
    opt("--peer", action="append", default=[], metavar="NAME=URL", help="another server")
    opt(
        "--peer-command",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="start peer NAME with CMD first (its URL still comes from --peer)",
    )
    opt(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        help="max-concurrency levels of the sweep (default: 1 8 32)",
    )
    opt(
        "--prompts-per-slot",
        type=int,
        default=0,
        help="send at least this many requests per concurrency slot (max(--num-prompts, K·c)), "
        "so that c = 32 keeps 32 requests in flight past its ramp (default: 0, off)",
    )
    opt("--threads", type=int, help="torch threads of each loopserve server")
    opt(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of each loopserve server, and of the GEMM peak measured beside them",
    )
    opt(
        "--serve-arg",
        action="append",
        default=[],
        help="extra arguments for both loopserve servers, e.g. '--kv-cache-memory 1GiB'",
    )
    opt("--quality-prompts", type=int, default=16, help="prompts for agreement (default: 16)")
    opt("--quality-len", type=int, default=32, help="greedy tokens per prompt (default: 32)")
    opt("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    opt("--out", default="benchmarks/results/compare", help="output directory")
    add_load_arguments(p)
    p.set_defaults(func=run_compare)
