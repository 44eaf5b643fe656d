"""Offline engine throughput: vanilla vs recursive, sequence-wise vs depth-wise, exits on/off.

Every configuration serves the same prompts with the same output lengths in one process, so
the ratios printed are measured in the same run on the same machine. Quality sits beside
speed: greedy agreement with the same model's full-depth output and with the vanilla model.

    python -m benchmarks.throughput --quick              # CPU, the default SmolLM2 models
    python -m benchmarks.throughput --random-weights     # GPU check: SmolLM2 shapes, no files
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.gemm_peak import DTYPES, gemm_peak, token_flops
from model.checkpoint import load_model
from model.config import LINEAR_MODULES, ArchConfig, ModelConfig, RecursionConfig
from model.recursive import RecursiveLM
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.exit_policy import EXITS_OFF
from scheduler.sampling import SamplingParams

SMOLLM2_ARCH = ArchConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    eos_token_id=(2,),
)


@dataclass
class RunResult:
    model: str
    batching: str
    threshold: float
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    tok_per_s: float
    mean_loops: float
    exit_rate: list[float]
    steps: int
    prompt_tokens: int = 0
    phase_ms: dict[str, float] = field(default_factory=dict)  # mean host ms per step
    gflops: float = 0.0
    peak_share: float = 0.0
    vs_vanilla: float = 0.0
    agree_full_depth: float = 1.0
    agree_vanilla: float = 1.0


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def lscpu() -> dict[str, str]:
    """``lscpu``'s fields, its flags included (the ISA decides the fast dtype); empty where
    there is no lscpu. The machine record of every benchmark's JSON."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def random_models() -> dict[str, RecursiveLM]:
    """SmolLM2-shaped models with random weights and deltas: speed only (no conversion, whose
    SVDs would only shape values; exits are meaningless on random weights)."""
    torch.manual_seed(0)
    base = ModelConfig(arch=SMOLLM2_ARCH)
    full = {m: base.full_rank(m) for m in LINEAR_MODULES}
    specs = {
        "vanilla": RecursionConfig(),
        "rrt3-exact": RecursionConfig(loops=3, init="average", ranks=full),
        "rrt3-r64": RecursionConfig(
            loops=3, init="average", ranks=dict.fromkeys(LINEAR_MODULES, 64)
        ),
    }
    models = {}
    for name, recursion in specs.items():
        model = RecursiveLM(base.with_recursion(recursion))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        models[name] = model
    return models


def default_models(r64_dir: Path | None) -> dict[str, RecursiveLM]:
    from model.default import ensure_default_model
    from model.pull import pull_default

    models = {
        "vanilla": load_model(pull_default()),
        "rrt3-exact": load_model(ensure_default_model()),
    }
    if r64_dir is not None:
        models["rrt3-r64"] = load_model(r64_dir)
    return models


def make_prompts(
    n: int, lengths: tuple[int, int], seed: int, vocab: int, text_ids: list[int] | None
) -> list[list[int]]:
    """``n`` prompts of random lengths: windows of real text when given, else random ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*lengths)
        if text_ids is None:
            out.append([rng.randrange(3, vocab) for _ in range(length)])
        else:
            start = rng.randrange(0, len(text_ids) - length)
            out.append(text_ids[start : start + length])
    return out


def eval_text_ids() -> list[int]:
    """The built-in evaluation text, tokenised with the default model's tokenizer."""
    from transformers import AutoTokenizer

    from model.fidelity import eval_text
    from model.pull import pull_default

    tok = AutoTokenizer.from_pretrained(str(pull_default()), local_files_only=True)
    return tok(eval_text())["input_ids"]


def run_once(
    model: RecursiveLM,
    prompts: list[list[int]],
    batching: str,
    threshold: float,
    concurrency: int,
    output_len: int,
    thresholds: tuple[float, ...] = (),
    measure: str = "prob",
) -> tuple[RunResult, list[list[int]]]:
    """Serve ``prompts`` greedily, ``output_len`` tokens each, and time it; ``thresholds``
    (calibrated, per depth, for ``measure``) replace ``threshold`` where given."""
    cfg = EngineConfig(
        batching=batching,
        exit_threshold=threshold,
        exit_thresholds=thresholds,
        exit_measure=measure,
        max_num_seqs=concurrency,
        max_num_batched_tokens=max(256, concurrency * 4),
        num_blocks=4096,
        block_size=16,
        max_model_len=4096,
    )
    engine = Engine(model, cfg)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    outputs: list[list[int]] = [[] for _ in prompts]
    loops = [0] * model.config.loops
    steps = 0
    phases: dict[str, float] = {}
    start = time.perf_counter()
    while engine.has_work:
        outs, stats = engine.step()
        steps += 1
        for phase, sec in stats.phase_seconds.items():
            phases[phase] = phases.get(phase, 0.0) + sec
        for o in outs:
            outputs[int(o.request_id[1:])].extend(o.token_ids)
            for d in o.exit_depths:
                loops[d] += 1
    seconds = time.perf_counter() - start
    total = sum(len(o) for o in outputs)
    mean_loops = sum((d + 1) * n for d, n in enumerate(loops)) / max(total, 1)
    result = RunResult(
        model="",
        batching=batching,
        threshold=threshold,
        concurrency=concurrency,
        requests=len(prompts),
        output_tokens=total,
        seconds=seconds,
        tok_per_s=total / seconds,
        mean_loops=mean_loops,
        exit_rate=[n / max(total, 1) for n in loops],
        steps=steps,
        prompt_tokens=sum(len(p) for p in prompts),
        phase_ms={k: 1000 * v / max(steps, 1) for k, v in phases.items()},
    )
    return result, outputs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=False)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def markdown(results: list[RunResult], header: str) -> str:
    lines = [
        header,
        "",
        "| model | batching | exit thr | conc | tok/s | GFLOP/s | of GEMM peak | vs vanilla "
        "| loops/tok | exit rate/depth | agree full-depth | agree vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        thr = "off" if r.threshold > 1 else f"{r.threshold:g}"
        rates = " / ".join(f"{100 * x:.0f}%" for x in r.exit_rate)
        lines.append(
            f"| {r.model} | {r.batching} | {thr} | {r.concurrency} | {r.tok_per_s:.1f} "
            f"| {r.gflops:.1f} | {r.peak_share:.0%} | {r.vs_vanilla:.2f}x | {r.mean_loops:.2f} "
            f"| {rates} "
            f"| {100 * r.agree_full_depth:.1f}% | {100 * r.agree_vanilla:.1f}% |"
        )
    phases = sorted({k for r in results for k in r.phase_ms})
    lines += [
        "",
        "Per-phase profile of a step (mean host ms per step):",
        "",
        "| model | batching | exit thr | conc | " + " | ".join(phases) + " |",
        "|---|---|---|---|" + "---|" * len(phases),
    ]
    for r in results:
        thr = "off" if r.threshold > 1 else f"{r.threshold:g}"
        cells = " | ".join(f"{r.phase_ms.get(k, 0.0):.2f}" for k in phases)
        lines.append(f"| {r.model} | {r.batching} | {thr} | {r.concurrency} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], path: Path) -> None:
    """Throughput vs concurrency: colour = model and batching, line style = exit threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    series = sorted({(r.model, r.batching) for r in results})
    thresholds = sorted({r.threshold for r in results}, reverse=True)
    styles = ["-", "--", "-.", ":", (0, (1, 3))]
    for i, (model, batching) in enumerate(series):
        for j, thr in enumerate(thresholds):
            rs = sorted(
                (
                    r
                    for r in results
                    if (r.model, r.batching, r.threshold) == (model, batching, thr)
                ),
                key=lambda r: r.concurrency,
            )
            if not rs:
                continue
            label = f"{model} {batching} exit={'off' if thr > 1 else f'{thr:g}'}"
            ax.plot(
                [r.concurrency for r in rs],
                [r.tok_per_s for r in rs],
                color=f"C{i}",
                linestyle=styles[j % len(styles)],
                marker="o",
                label=label,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (max_num_seqs)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"loopserve engine throughput — {machine_name()}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--random-weights", action="store_true", help="SmolLM2 shapes, random weights")
    p.add_argument("--r64", type=Path, help="a B=3 rank-64 loopserve checkpoint to include")
    p.add_argument("--quick", action="store_true", help="fewer configurations (CPU)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--thresholds", type=float, nargs="+", default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    conc = args.concurrency or ([1, 8, 32] if args.quick else [1, 8, 32, 64])
    thresholds = args.thresholds or ([0.8] if args.quick else [0.9, 0.8, 0.6])
    out_len = args.output_len or (24 if args.quick else 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = DTYPES[args.dtype] if args.dtype else dtype
    peak = gemm_peak(str(dtype).removeprefix("torch."), args.threads)
    models = random_models() if args.random_weights else default_models(args.r64)
    for m in models.values():
        m.to(device=device, dtype=dtype)
        prepare_for_serving(m)
    vocab = next(iter(models.values())).config.arch.vocab_size
    text_ids = None if args.random_weights else eval_text_ids()
    plan = [("vanilla", "sequence", EXITS_OFF)]
    for name in (n for n in models if n != "vanilla"):
        plan += [(name, "sequence", EXITS_OFF), (name, "depth", EXITS_OFF)]
        if not args.random_weights:
            plan += [(name, b, t) for t in thresholds for b in ("sequence", "depth")]
    results: list[RunResult] = []
    outputs: dict[tuple, list[list[int]]] = {}
    bar = tqdm(total=len(plan) * len(conc), desc="throughput runs")
    for c in conc:
        prompts = make_prompts(max(c, 16), (16, 96), args.seed + c, vocab, text_ids)
        run_once(models["vanilla"], prompts[:2], "sequence", EXITS_OFF, c, 4)  # warm-up
        for name, batching, thr in plan:
            r, outs = run_once(models[name], prompts, batching, thr, c, out_len)
            r.model = name
            outputs[(name, batching, thr, c)] = outs
            results.append(r)
            bar.update()
    bar.close()
    prompt_flops, output_flops = token_flops(
        SMOLLM2_ARCH if args.random_weights else models["vanilla"].config.arch
    )
    for r in results:
        r.gflops = (
            (r.prompt_tokens * prompt_flops + r.output_tokens * output_flops) / r.seconds / 1e9
        )
        r.peak_share = r.gflops / peak
        base = next(x for x in results if x.model == "vanilla" and x.concurrency == r.concurrency)
        r.vs_vanilla = r.tok_per_s / base.tok_per_s
        full = outputs[(r.model, "sequence", EXITS_OFF, r.concurrency)]
        mine = outputs[(r.model, r.batching, r.threshold, r.concurrency)]
        r.agree_full_depth = agreement(mine, full)
        r.agree_vanilla = agreement(
            mine, outputs[("vanilla", "sequence", EXITS_OFF, r.concurrency)]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"### Engine throughput — {machine_name()}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"commit {git_commit()}, {'random' if args.random_weights else 'real'} weights, "
        f"{str(dtype).removeprefix('torch.')}, output {out_len} tokens/request, "
        f"GEMM peak {peak:.1f} GFLOP/s (same run)"
    )
    table = markdown(results, header)
    (args.out / "throughput.md").write_text(table)
    (args.out / "throughput.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot(results, args.out / "throughput.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
