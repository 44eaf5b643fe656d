"""Calibrated early exits end to end: what each agreement target buys in tok/s, and at what cost.

On a copy of a checkpoint (the original is never written), exit heads are trained once
(``loopserve calibrate --exit-heads``'s training, on the first half of the checkpoint's own
samples from the calibration prompt set); reusing them, thresholds are fitted per target and
measure on the other half with the fixed-sequence guarantee and verified on its samples from
the held-out prompt set (``training.calibrate``). The offline engine then serves prompts from a
third source — windows of the built-in evaluation text, as ``benchmarks.throughput`` — exits off
and under each target's thresholds (``run_once``, greedy, same concurrency, threads and dtype):
tok/s, the loops per token the engine ran and its greedy agreement with the exits-off tokens.
Thresholds are fitted in float32 (as ``calibrate`` does), served in ``--dtype``. Per target the
measure with the fewest verified loops among those whose verified agreement holds at every
early depth is marked chosen; every measure is timed. The three sources are disjoint by
construction; the run checks it (13-word runs the samples, less the chat template's own words,
share with the evaluation text and with each other: ``shared_runs``, 0 = disjoint).

    python -m benchmarks.exit_targets --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.gemm_peak import DTYPES
from benchmarks.throughput import (
    RunResult,
    agreement,
    git_commit,
    lscpu,
    machine_name,
    make_prompts,
    run_once,
)
from loopserve_kernels.dispatch import use_backend
from model.calibration_data import HELDOUT_TOKENS, render_prompt, shared_runs
from model.checkpoint import LOOPSERVE_CONFIG, load_model
from model.default import default_model_dir
from model.fidelity import eval_text
from model.pull import loopserve_home
from model.serving import prepare_for_serving
from scheduler.exit_policy import EXITS_OFF
from training.calibrate import (
    DELTA,
    CalibrationInputs,
    CalibrationResult,
    ExitRates,
    calibration_inputs,
    collect_depth_stats,
    fit_and_verify,
    write_calibration,
)
from training.distill_data import load_tokenizer
from training.exit_heads import HeadReport, HeadTraining

DEFAULT_TARGETS = (0.99, 0.95, 0.90, 0.80)
SENTINEL = "XYZZY"  # a prompt that marks where the chat template's own text ends


@dataclass(frozen=True)
class Plan:
    """Everything a run depends on besides the checkpoint."""

    targets: tuple[float, ...] = DEFAULT_TARGETS
    delta: float = DELTA
    heads: HeadTraining = field(
        default_factory=lambda: HeadTraining(steps=1_000_000, max_seconds=300.0)
    )
    tokens: int = 8192  # self-distilled calibration tokens (half train the heads)
    seq_len: int = 256
    heldout_tokens: int = HELDOUT_TOKENS
    requests: int = 64
    prompt_len: tuple[int, int] = (16, 96)
    concurrency: int = 32
    output_len: int = 64
    batching: str = "depth"
    dtype: str = "bfloat16"
    seed: int = 0


@dataclass
class Row:
    """One engine run: exits off (``target`` None) or one target's thresholds for ``measure``;
    ``holds``: every early depth's verified agreement is >= target; ``chosen``: the measure
    with the fewest verified loops among those that hold."""

    target: float | None
    measure: str
    thresholds: list[float]
    fitted: ExitRates | None
    verified: ExitRates | None
    holds: bool
    chosen: bool
    engine: RunResult
    ratio: float = 1.0
    agree_exits_off: float = 1.0


@dataclass
class Report:
    rows: list[Row]
    heads: HeadReport | None
    fit_tokens: int
    heldout_tokens: int
    head_tokens: int
    shared_runs: dict[str, int]  # 13-word runs two data sources share: 0 is disjoint
    checkpoint: str


def copy_checkpoint(source: Path, dest: Path) -> Path:
    """A fresh copy of ``source`` at ``dest`` (mtimes kept: the self-distilled cache is keyed
    by them); a previous copy there is replaced, the original is never touched."""
    if not (source / LOOPSERVE_CONFIG).exists():
        raise SystemExit(f"{source} is not a loopserve checkpoint (no {LOOPSERVE_CONFIG})")
    if dest.resolve() == source.resolve():
        raise SystemExit("the copy must not be the original checkpoint")
    if dest.exists():
        if not (dest / LOOPSERVE_CONFIG).exists():
            raise SystemExit(f"{dest} exists and is no checkpoint copy: refusing to replace it")
        shutil.rmtree(dest)
    return Path(shutil.copytree(source, dest, copy_function=shutil.copy2))


def calibrate_targets(
    checkpoint: Path, plan: Plan, progress: bool
) -> tuple[CalibrationInputs, list[CalibrationResult]]:
    """Heads trained once; every target fitted and verified on the same recorded stats."""
    inputs = calibration_inputs(
        checkpoint,
        tokens=plan.tokens,
        seq_len=plan.seq_len,
        progress=progress,
        heads=plan.heads,
        heldout_tokens=plan.heldout_tokens,
    )
    with use_backend("torch"):
        stats = collect_depth_stats(inputs.model, inputs.windows)
        held = collect_depth_stats(inputs.model, inputs.heldout)
    return inputs, [fit_and_verify(stats, held, t, plan.delta) for t in plan.targets]


def _holds(rates: ExitRates, target: float) -> bool:
    return all(a >= target for a in rates.agreement[:-1])  # 1.0 where no token exits


def time_targets(
    model: torch.nn.Module,
    prompts: list[list[int]],
    results: list[CalibrationResult],
    plan: Plan,
    progress: bool,
) -> list[Row]:
    """Exits off, then every (target, measure): one warmed-up ``run_once`` each."""
    configs: list[tuple[CalibrationResult | None, str, tuple[float, ...]]] = [(None, "prob", ())]
    configs += [(r, m, tuple(t)) for r in results for m, t in r.thresholds.items()]
    rows: list[Row] = []
    outputs: list[list[list[int]]] = []
    c, n = plan.concurrency, plan.output_len
    for result, measure, thr in tqdm(configs, desc="engine runs", disable=not progress):
        run_once(model, prompts[:2], plan.batching, EXITS_OFF, c, 4, thr, measure)  # warm-up
        run, tokens = run_once(model, prompts, plan.batching, EXITS_OFF, c, n, thr, measure)
        outputs.append(tokens)
        if result is None:
            run.model = "exits off"
            off = [EXITS_OFF] * (model.config.loops - 1)
            row = Row(None, "off", off, None, None, holds=True, chosen=False, engine=run)
        else:
            run.model = f"{measure} @ {result.target:g}"
            verified = result.verified[measure]
            row = Row(
                result.target,
                measure,
                list(thr),
                result.fitted[measure],
                verified,
                holds=_holds(verified, result.target),
                chosen=False,
                engine=run,
            )
        row.ratio = run.tok_per_s / rows[0].engine.tok_per_s if rows else 1.0
        row.agree_exits_off = agreement(tokens, outputs[0])
        rows.append(row)
    for target in plan.targets:
        held = [r for r in rows if r.target == target and r.holds]
        if held:
            min(held, key=lambda r: r.verified.mean_loops).chosen = True
    return rows


def run(source: Path, work: Path, plan: Plan, progress: bool = True) -> Report:
    """The benchmark's core: copy, calibrate every target, write the heads (and the first
    target's thresholds) into the copy, load it for serving and time it."""
    checkpoint = copy_checkpoint(source, work / "checkpoint")
    inputs, results = calibrate_targets(checkpoint, plan, progress)
    write_calibration(checkpoint, inputs, results[0], seq_len=plan.seq_len)
    tokenizer = load_tokenizer(checkpoint)
    text = eval_text()

    # the chat template's own words (a system prompt) are in every sample: not data
    fixed = tokenizer.decode(render_prompt(SENTINEL, tokenizer), skip_special_tokens=True)
    template = [f for f in fixed.split(SENTINEL) if f.strip()] if SENTINEL in fixed else []

    def decoded(windows: torch.Tensor) -> list[str]:
        texts = [tokenizer.decode(w, skip_special_tokens=True) for w in windows.tolist()]
        for f in template:
            texts = [t.replace(f, "\n") for t in texts]
        return texts

    calibration = decoded(inputs.windows)
    if inputs.head_windows is not None:
        calibration += decoded(inputs.head_windows)
    heldout = decoded(inputs.heldout)
    overlap = {
        "calibration~evaluation": shared_runs(calibration, [text]),
        "heldout~evaluation": shared_runs(heldout, [text]),
        "calibration~heldout": shared_runs(calibration, heldout),
    }
    model = load_model(checkpoint, dtype=DTYPES[plan.dtype])
    prepare_for_serving(model)
    ids = tokenizer(text)["input_ids"]
    prompts = make_prompts(
        plan.requests, plan.prompt_len, plan.seed, model.config.arch.vocab_size, ids
    )
    rows = time_targets(model, prompts, results, plan, progress)
    return Report(
        rows=rows,
        heads=inputs.report,
        fit_tokens=inputs.windows.numel(),
        heldout_tokens=inputs.heldout.numel(),
        head_tokens=0 if inputs.head_windows is None else inputs.head_windows.numel(),
        shared_runs=overlap,
        checkpoint=str(checkpoint),
    )


def _pct(xs: list[float]) -> str:
    return " / ".join(f"{100 * x:.1f}%" for x in xs)


def markdown(report: Report, header: str) -> str:
    lines = [
        header,
        "",
        "| target | measure | thresholds per depth | coverage per depth: fitted; verified "
        "| verified agreement: exits per depth; overall | mean loops (verified) "
        "| engine mean loops | tok/s | ratio vs exits-off | agreement with exits-off |",
        "|" + "---|" * 10,
    ]
    for r in report.rows:
        thr = " / ".join("never" if t > 1 else f"{t:.4f}" for t in r.thresholds)
        measure = f"**{r.measure}** (chosen)" if r.chosen else r.measure
        if r.verified is None or r.fitted is None:
            cells = f"— | exits off | {thr} | — | — | —"
        else:
            v = r.verified
            exits = " / ".join(
                f"{100 * a:.1f}%" if cov else "—"
                for a, cov in zip(v.agreement[:-1], v.coverage, strict=False)
            )
            cells = (
                f"{r.target:g} | {measure} | {thr} | {_pct(r.fitted.coverage)}; "
                f"{_pct(v.coverage)} | {exits}; "
                f"{100 * v.overall_agreement:.2f}%{'' if r.holds else ' (fails)'} "
                f"| {v.mean_loops:.3f}"
            )
        lines.append(
            f"| {cells} | {r.engine.mean_loops:.3f} | {r.engine.tok_per_s:.1f} "
            f"| {r.ratio:.3f}x | {100 * r.agree_exits_off:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path, title: str) -> None:
    """Per measure against the target: tok/s over exits off, and agreement (verified
    held-out, and the engine's with the exits-off tokens); chosen rows ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.target is not None]
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(dict.fromkeys(r.measure for r in rows)):
        rs = sorted((r for r in rows if r.measure == m), key=lambda r: r.target)
        x = [100 * r.target for r in rs]
        speed.plot(x, [r.ratio for r in rs], marker="o", color=f"C{i}", label=m)
        quality.plot(x, [100 * r.agree_exits_off for r in rs], marker="o", color=f"C{i}", label=m)
        quality.plot(
            x,
            [100 * r.verified.overall_agreement for r in rs],
            marker="x",
            ls="--",
            color=f"C{i}",
            label=f"{m}: verified held-out",
        )
        chosen = [r for r in rs if r.chosen]
        speed.scatter(
            [100 * r.target for r in chosen],
            [r.ratio for r in chosen],
            s=160,
            facecolors="none",
            edgecolors="k",
        )
    speed.axhline(1.0, color="grey", lw=0.8)
    speed.set(xlabel="agreement target %", ylabel="tok/s vs exits off")
    quality.set(xlabel="agreement target %", ylabel="greedy agreement %")
    speed.legend(fontsize=8)
    quality.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def uncommitted() -> bool:
    """Whether the working tree differs from the commit the results are labelled with."""
    out = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", type=Path, help="checkpoint, copied (default: the exact default model)"
    )
    p.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--delta", type=float, default=DELTA)
    p.add_argument("--head-seconds", type=float, default=300.0, help="head-training bound")
    p.add_argument(
        "--head-steps", type=int, default=1_000_000, help="step bound (default: time-bound)"
    )
    p.add_argument("--tokens", type=int, default=Plan.tokens, help="calibration tokens")
    p.add_argument("--heldout-tokens", type=int, default=HELDOUT_TOKENS)
    p.add_argument("--requests", type=int, default=Plan.requests, help="benchmark prompts")
    p.add_argument("--concurrency", type=int, default=Plan.concurrency)
    p.add_argument("--output-len", type=int, default=Plan.output_len)
    p.add_argument("--batching", choices=("depth", "sequence"), default=Plan.batching)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=Plan.dtype, help="engine dtype")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/exit_targets"))
    p.add_argument(
        "--work",
        type=Path,
        help="where the checkpoint copy goes (default: $LOOPSERVE_HOME/cache/exit_targets, "
        "outside the repository; a stable place lets a rerun reuse the copy's samples)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads = HeadTraining(
        steps=args.head_steps, max_seconds=args.head_seconds, progress=not args.no_progress
    )
    plan = Plan(
        targets=tuple(args.targets),
        delta=args.delta,
        heads=heads,
        tokens=args.tokens,
        heldout_tokens=args.heldout_tokens,
        requests=args.requests,
        concurrency=args.concurrency,
        output_len=args.output_len,
        batching=args.batching,
        dtype=args.dtype,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source = (args.model or default_model_dir()).expanduser()
    work = args.work or loopserve_home() / "cache" / "exit_targets"
    report = run(source, work, plan, progress=not args.no_progress)
    commit = git_commit() + ("+uncommitted" if uncommitted() else "")
    date = time.strftime("%Y-%m-%d", time.gmtime())
    header = (
        f"### Calibrated exits per target — {machine_name()}, {date}, commit {commit}, "
        f"{source.name}, engine {args.dtype} {args.batching}-wise c = {args.concurrency}, "
        f"{args.requests} prompts x {args.output_len} greedy tokens, {args.threads} threads; "
        f"fitted on {report.fit_tokens} tokens (delta {args.delta}), verified on "
        f"{report.heldout_tokens}, heads trained on {report.head_tokens}"
    )
    table = markdown(report, header)
    record = {
        "machine": machine_name(),
        "lscpu": lscpu(),
        "date": date,
        "commit": commit,
        "argv": sys.argv[1:] if argv is None else argv,
        "plan": asdict(plan),
        "seconds": time.perf_counter() - start,
        **asdict(report),
    }
    (args.out / "exit_targets.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "exit_targets.md").write_text(table)
    plot(report, args.out / "exit_targets.png", header.removeprefix("### "))
    print(table)
    print(f"shared 13-word runs (0 = disjoint): {report.shared_runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
