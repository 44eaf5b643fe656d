"""Training throughput: tokens/s and peak memory of ``loopserve uptrain`` on 1, 2, … processes.

    python -m benchmarks.train_throughput [--procs 1 2] [--threads 2] [--steps 12] \
        [--loops 3 --rank 64] [--seq-len 256 --batch-size 4] [--out DIR]
    python -m benchmarks.train_throughput --tiny --steps 3        # a smoke run in seconds

Each configuration is the real command in a fresh process: ``python -m training.cli uptrain``
for one process, ``torchrun --standalone --nproc-per-node N -m training.cli uptrain`` for N,
with the same *global* batch (so the same work per step) and ``--threads`` compute threads
split evenly between the processes (``OMP_NUM_THREADS``). The teacher is the pulled
SmolLM2-135M-Instruct (``loopserve pull --source-only``); the student its conversion (average
init, ``--rank``), made once under ``--work``. ``--tiny`` swaps both for a 2-layer random model
with SmolLM2's tokenizer and vocabulary. Data: the built-in evaluation text, repeated (the
content does not change the speed). The figures come from the run summary
(``training.uptrain.RunSummary``): training tokens per second over every step (the held-out
evaluations are outside it) and each rank's peak memory (peak RSS on the CPU, the CUDA
allocator's peak on a GPU). Writes ``train_throughput.json`` and ``.md`` to ``--out``.

Timings are only meaningful on a quiet machine; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _tiny_teacher(src: Path, out: Path) -> Path:
    """A 2-layer random Llama with the source's tokenizer and vocabulary (for smoke runs)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=json.loads((src / "config.json").read_text())["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def _student(teacher: Path, out: Path, loops: int, rank: int) -> Path:
    if (out / "loopserve.json").exists():
        return out
    from model.build import convert_checkpoint
    from model.config import LINEAR_MODULES

    ranks = dict.fromkeys(LINEAR_MODULES, rank)
    convert_checkpoint(teacher, out, loops=loops, init="average", ranks=ranks, evaluate=False)
    return out


def _data(work: Path) -> Path:
    text = resources.files("model").joinpath("data/eval_text.txt").read_text(encoding="utf-8")
    path = work / "train_text.txt"
    path.write_text(text * 8, encoding="utf-8")
    return path


def run_one(args: argparse.Namespace, teacher: Path, student: Path, procs: int) -> dict[str, Any]:
    """One ``uptrain`` run on ``procs`` processes; its summary plus the settings."""
    out = args.work / f"run_{procs}p"
    shutil.rmtree(out, ignore_errors=True)
    summary = args.work / f"summary_{procs}p.json"
    uptrain = [
        "-m", "training.cli", "uptrain", "--student", str(student), "--teacher", str(teacher),
        "--out", str(out), "--data", str(_data(args.work)), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
        "--steps", str(args.steps), "--eval-every", str(10**9), "--eval-windows", "1",
        "--checkpoint-every", "0", "--loss-chunk", str(args.loss_chunk),
        "--strategy", args.strategy, "--device", args.device, "--no-progress", "--no-plot",
        "--json", str(summary),
    ]  # fmt: skip
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    threads = max(1, args.threads // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    print(f"== {procs} process(es), {threads} thread(s) each: {' '.join(uptrain[2:4])} ...")
    subprocess.run([*launcher, *uptrain], cwd=ROOT, env=env, check=True)
    result = json.loads(summary.read_text())
    return {
        "processes": procs,
        "threads_per_process": threads,
        "strategy": result["strategy"],
        "steps": result["step"],
        "tokens": result["tokens_seen"],
        "train_seconds": result["train_seconds"],
        "tokens_per_second": result["tokens_per_second"],
        "peak_memory_bytes": result["peak_memory_bytes"],
    }


def _table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Training throughput, {meta['model']} ({meta['device']}, seq {meta['seq_len']} x "
        f"global batch {meta['batch_size']} x accumulation {meta['grad_accum']}, "
        f"{meta['steps']} steps, loss chunk {meta['loss_chunk']})",
        "",
        "| processes | threads each | strategy | tokens/s | peak memory per rank (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mem = " / ".join(f"{b / 2**20:,.0f}" for b in r["peak_memory_bytes"])
        lines.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['strategy']} | "
            f"{r['tokens_per_second']:,.1f} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total, all procs")
    p.add_argument("--teacher", type=Path, default=None, help="default: the pulled SmolLM2")
    p.add_argument("--tiny", action="store_true", help="2-layer random model (smoke run)")
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="global, split over processes")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/loopserve_train_throughput"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput")
    args = p.parse_args(argv)
    from model.pull import source_model_dir

    src = args.teacher or source_model_dir()
    if not (src / "config.json").exists():
        p.error(f"no teacher at {src}: run `loopserve pull --source-only` or pass --teacher")
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = _tiny_teacher(src, args.work / "tiny_teacher") if args.tiny else src
    tag = "tiny" if args.tiny else f"b{args.loops}_r{args.rank}"
    student = _student(teacher, args.work / f"student_{tag}", args.loops, args.rank)
    rows = [run_one(args, teacher, student, n) for n in args.procs]
    meta = {
        "model": f"{'tiny random' if args.tiny else src.name} -> B={args.loops} rank {args.rank}",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        **{k: getattr(args, k) for k in ("device", "seq_len", "batch_size", "grad_accum")},
        **{k: getattr(args, k) for k in ("steps", "loss_chunk", "threads")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    table = _table(rows, meta)
    (args.out / "train_throughput.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
