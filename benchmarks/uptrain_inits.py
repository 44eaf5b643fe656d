"""Uptraining from the data-aware init against uptraining from today's, on one budget.

    python -m benchmarks.uptrain_inits [--source DIR] [--loops 3 --rank 64] [--steps 40] \\
        [--max-minutes 8] [--threads 2] [--out benchmarks/results/uptrain_inits]

Converts the source (default: the pulled SmolLM2-135M-Instruct) once per delta method at the
same B and rank (``model.build.convert_checkpoint``, what ``loopserve convert`` runs: average
init; ``plain`` = the paper's SVD of the weight residual, ``sequential`` = the data-aware
default calibrated on the source's own samples), then runs the real ``loopserve uptrain``
(``python -m training.cli uptrain`` in a fresh process) from each with the same settings: the
same steps, LR schedule, seed, data and data order, the exit weights ramped in over
``--exit-warmup``. Every evaluation logs the conversion's fidelity report (``--eval-fidelity``:
KL, top-1 agreement and perplexity against the source on the built-in text and the held-out
self-distilled samples), so step 0 of each curve is its conversion's own report. Training data
are the source's samples of the uptraining prompts, disjoint from both evaluation sets and
from the calibration prompts; both runs share one cache of them.

The budget is ``--steps`` per init; ``--max-minutes`` bounds each run, and when it cuts the
first run short at step k the others stop at step k too (``--stop-at-step``, the schedule
still spanning ``--steps``), so the curves keep the same evaluation points. Writes
``uptrain_inits.json`` (the config, both conversions' reports, every evaluation of both runs,
lscpu, date, commit), ``uptrain_inits.md`` (a table) and ``uptrain_inits.png`` (KL and
agreement against training tokens, both inits side by side) to ``--out``.

Takes ~20-25 minutes on the shared 2-core EPYC at 2 threads with the defaults (calibration and
held-out samples cached under $LOOPSERVE_HOME/cache after the first conversion); run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.throughput import git_commit, lscpu
from model.build import convert_checkpoint
from model.config import INIT_METHODS, LINEAR_MODULES
from model.convert import CONVERT_METHODS
from model.pull import source_model_dir

ROOT = Path(__file__).resolve().parents[1]
SETS = {"builtin": "fidelity", "heldout": "fidelity_heldout"}  # name -> eval.jsonl key
LABELS = {"builtin": "built-in text", "heldout": "held-out samples"}


@dataclass(frozen=True)
class Budget:
    """What every init gets: the conversion's shape and one uptraining run's settings."""

    loops: int = 3
    rank: int = 64
    init: str = "average"
    calibration_tokens: int = 8192
    train_tokens: int = 12_000
    gen_len: int = 128
    gen_batch: int = 32
    seq_len: int = 256
    steps: int = 40
    batch_size: int = 2
    lr: float = 2e-4
    warmup: int = 5
    exit_warmup: int = 20
    eval_every: int = 8
    max_minutes: float = 8.0
    seed: int = 0
    threads: int = 2

    def uptrain_args(self) -> list[str]:
        """The ``uptrain`` options every run shares."""
        return [
            "--self-distill", str(self.train_tokens), "--gen-len", str(self.gen_len),
            "--gen-batch", str(self.gen_batch), "--seq-len", str(self.seq_len),
            "--steps", str(self.steps), "--batch-size", str(self.batch_size),
            "--lr", str(self.lr), "--warmup", str(self.warmup),
            "--exit-warmup", str(self.exit_warmup), "--eval-every", str(self.eval_every),
            "--max-minutes", str(self.max_minutes), "--seed", str(self.seed),
            "--checkpoint-every", "0", "--device", "cpu", "--eval-fidelity", "--no-plot",
        ]  # fmt: skip


def convert_init(src: Path, out: Path, method: str, budget: Budget, progress: bool) -> dict:
    """Convert ``src`` with ``method`` deltas into ``out``; the report ``loopserve convert``
    prints (parameters, fidelity on both evaluation sets, wall time)."""
    ranks = dict.fromkeys(LINEAR_MODULES, budget.rank)
    result = convert_checkpoint(
        src,
        out,
        loops=budget.loops,
        init=budget.init,
        ranks=ranks,
        seed=budget.seed,
        seq_len=budget.seq_len,
        method=method,
        self_distill_tokens=budget.calibration_tokens,
        progress=progress,
    )
    assert result.fidelity is not None and result.fidelity_heldout is not None
    return {
        "parameters": result.report.converted_params,
        "source_parameters": result.report.source_params,
        "calibration_tokens": result.report.calibration_tokens,
        "seconds_shared_machine": result.seconds,
        "builtin": result.fidelity.to_dict(),
        "heldout": result.fidelity_heldout.to_dict(),
    }


def launch(argv: list[str], env: dict[str, str]) -> None:
    """Run ``argv`` from the repository root; a failure stops the benchmark."""
    subprocess.run(argv, cwd=ROOT, env=env, check=True)


def uptrain_init(
    src: Path, student: Path, work: Path, budget: Budget, stop_step: int | None, progress: bool
) -> dict:
    """One ``loopserve uptrain`` run in a fresh process; its summary and evaluation log."""
    out = work / f"{student.name}_uptrained"
    shutil.rmtree(out, ignore_errors=True)
    summary = work / f"{student.name}_summary.json"
    argv = [sys.executable, "-m", "training.cli", "uptrain", "--student", str(student)]
    argv += ["--teacher", str(src), "--out", str(out), *budget.uptrain_args()]
    argv += ["--self-distill-cache", str(work / "train_samples.jsonl"), "--json", str(summary)]
    if stop_step is not None:
        argv += ["--stop-at-step", str(stop_step)]
    if not progress:
        argv.append("--no-progress")
    launch(argv, {**os.environ, "OMP_NUM_THREADS": str(budget.threads), "PYTHONPATH": str(ROOT)})
    log = (out / "uptrain" / "eval.jsonl").read_text().splitlines()
    provenance = json.loads((out / "loopserve.json").read_text())["provenance"]["uptrain"]
    return {
        "summary": json.loads(summary.read_text()),
        "train_windows": provenance["train_windows"],
        "curve": [json.loads(r) for r in log],
    }


def run_benchmark(
    src: Path, work: Path, budget: Budget, methods: list[str], progress: bool = True
) -> dict[str, Any]:
    """Convert and uptrain from every method's init; the record ``uptrain_inits.json`` holds."""
    torch.set_num_threads(budget.threads)
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    stop_step = None
    bar = tqdm(methods, desc="inits", disable=not progress)
    for method in bar:
        bar.set_postfix(init=method)
        student = work / f"{method}_b{budget.loops}_r{budget.rank}"
        conversion = convert_init(src, student, method, budget, progress)
        run = uptrain_init(src, student, work, budget, stop_step, progress)
        if run["summary"]["stopped_early"] and stop_step is None:
            stop_step = run["summary"]["step"]
        runs[method] = {"conversion": conversion, **run}
    return {
        "source": str(src.resolve()),
        "budget": asdict(budget),
        "methods": methods,
        "runs": runs,
        "stop_step": stop_step,
        "common_steps": common_steps(runs),
        "below_everywhere": below_everywhere(runs, methods),
        "machine": lscpu(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "torch": torch.__version__,
    }


def common_steps(runs: dict[str, dict]) -> list[int]:
    """The evaluation steps every run has (all of them unless a run stopped earlier)."""
    steps = [{r["step"] for r in run["curve"]} for run in runs.values()]
    return sorted(set.intersection(*steps))


def _at(run: dict, step: int, name: str) -> dict:
    return next(r for r in run["curve"] if r["step"] == step)[SETS[name]]


def below_everywhere(runs: dict[str, dict], methods: list[str]) -> dict[str, bool]:
    """Per evaluation set: whether the last method's KL is below the first's at every common
    evaluation point (the issue's target: data-aware below plain)."""
    first, last = runs[methods[0]], runs[methods[-1]]
    steps = common_steps(runs)
    return {
        name: all(_at(last, s, name)["kl"] < _at(first, s, name)["kl"] for s in steps)
        for name in SETS
    }


def table(record: dict[str, Any]) -> str:
    """Markdown: one row per common evaluation step; each cell gives every method's figure,
    in ``--methods`` order."""
    methods, runs, b = record["methods"], record["runs"], record["budget"]
    first = runs[methods[0]]
    tokens = {r["step"]: r["tokens_seen"] for r in first["curve"]}
    source = first["conversion"]
    cpu = record["machine"].get("Model name", "?")
    vs = " / ".join(methods)
    lines = [
        f"`python -m benchmarks.uptrain_inits`, {record['date']}, commit {record['commit']}; "
        f"{Path(record['source']).name} ({source['source_parameters']:,} parameters) -> "
        f"B = {b['loops']}, rank {b['rank']}, {b['init']} init "
        f"({source['parameters'] / 1e6:.1f} M parameters), deltas {vs}. The same "
        f"`loopserve uptrain` run from each: {b['steps']} steps of {b['batch_size']} x "
        f"{b['seq_len']} tokens, LR {b['lr']:g} ({b['warmup']} warm-up steps, cosine), exit "
        f"weights ramped in over {b['exit_warmup']} steps, {b['train_tokens']:,} tokens of "
        f"the source's own samples (uptraining prompts), seed {b['seed']}; {cpu}, "
        f"{b['threads']} threads. KL (nats/token) and top-1 agreement against the source on "
        f"the built-in text and the held-out samples; step 0 is each conversion's own report. "
        f"Each cell: {vs}.",
        "",
        "| step | tokens | KL built-in | agreement built-in | KL held-out | agreement held-out "
        "| perplexity held-out |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in record["common_steps"]:
        row = [str(s), f"{tokens[s]:,}"]
        for name, key, fmt in (
            ("builtin", "kl", ".2f"),
            ("builtin", "agreement", ".1%"),
            ("heldout", "kl", ".2f"),
            ("heldout", "agreement", ".1%"),
            ("heldout", "converted_ppl", ".4g"),
        ):
            row.append(" / ".join(format(_at(runs[m], s, name)[key], fmt) for m in methods))
        lines.append("| " + " | ".join(row) + " |")
    verdict = ", ".join(
        f"{LABELS[n]}: {'yes' if ok else 'no'}" for n, ok in record["below_everywhere"].items()
    )
    lines += ["", f"{methods[-1]} below {methods[0]} in KL at every point: {verdict}."]
    if record["stop_step"] is not None:
        lines.append(f"The time bound stopped the runs at step {record['stop_step']}.")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path:
    """KL (log scale) and agreement against training tokens: one colour per init, solid on
    the held-out samples, dashed on the built-in text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, agree_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, method in enumerate(record["methods"]):
        colour = f"C{i}"
        curve = record["runs"][method]["curve"]
        x = [r["tokens_seen"] for r in curve]
        for name, style in (("heldout", "-"), ("builtin", "--")):
            label = f"{method}, {LABELS[name]}"
            kl = [r[SETS[name]]["kl"] for r in curve]
            agree = [100 * r[SETS[name]]["agreement"] for r in curve]
            kl_ax.plot(x, kl, style, color=colour, marker="o", ms=3, label=label)
            agree_ax.plot(x, agree, style, color=colour, marker="o", ms=3, label=label)
    kl_ax.set(ylabel="KL(source ‖ student), nats/token", yscale="log")
    agree_ax.set(ylabel="top-1 agreement with the source, %")
    for ax in (kl_ax, agree_ax):
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    b = record["budget"]
    fig.suptitle(
        f"uptraining B = {b['loops']} rank {b['rank']} from each init "
        f"({b['steps']} steps, {record['date']}, {record['commit']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(record: dict[str, Any], out: Path) -> str:
    """``uptrain_inits.{json,md,png}`` in ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "uptrain_inits.json").write_text(json.dumps(record, indent=1) + "\n")
    text = table(record)
    (out / "uptrain_inits.md").write_text(text)
    plot(record, out / "uptrain_inits.png")
    return text


def main(argv: list[str] | None = None) -> int:
    d = Budget()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.uptrain_inits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", type=Path, help="HF source directory (default: the pulled SmolLM2)")
    p.add_argument("--methods", nargs="+", choices=CONVERT_METHODS, default=["plain", "sequential"])
    p.add_argument("--init", choices=INIT_METHODS, default=d.init)
    for name in ("loops", "rank", "calibration_tokens", "train_tokens", "gen_len", "gen_batch"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("seq_len", "steps", "batch_size", "warmup", "exit_warmup", "eval_every"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="per init")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads, every phase")
    p.add_argument("--work", type=Path, default=Path("/tmp/loopserve_uptrain_inits"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/uptrain_inits")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    src = args.source or source_model_dir()
    if not (src / "config.json").exists():
        p.error(f"no source model at {src}: run `loopserve pull --source-only` or pass --source")
    budget = Budget(**{f: getattr(args, f) for f in Budget.__dataclass_fields__})
    record = run_benchmark(src, args.work, budget, args.methods, not args.no_progress)
    print(write_outputs(record, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
