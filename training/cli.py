"""The ``uptrain`` and ``calibrate`` commands: their runs, reports and argparse wiring.

``add_uptrain_parser`` / ``add_calibrate_parser`` add a sub-command to any argparse
sub-parsers object and set ``func`` to a handler taking the parsed Namespace and returning an
exit code; errors in the user's input print one line and return 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from model.calibration_data import CalibrationError as CalibrationDataError
from model.checkpoint import CheckpointError
from model.config import ConfigError
from training import distributed
from training.calibrate import DELTA, CalibrationError, calibrate_checkpoint
from training.distill_data import DataConfig, DataError
from training.exit_heads import HeadTraining, HeadTrainingError
from training.uptrain import (
    DEFAULT_GROUPS,
    Probe,
    RunSummary,
    UptrainConfig,
    Uptrainer,
    UptrainError,
)

USER_ERRORS = (
    UptrainError,
    DataError,
    CalibrationError,
    CalibrationDataError,
    HeadTrainingError,
    CheckpointError,
    ConfigError,
)


def plot_curve(log_path: str | Path, png_path: str | Path, title: str = "uptraining") -> Path:
    """Draw KL, agreement (final and per loop) and perplexity against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    if not records:
        raise UptrainError(f"{log_path} holds no evaluation records")
    x = [r["tokens_seen"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(x, [r["kl"] for r in records], marker="o")
    axes[0].set(ylabel="KL(teacher ‖ student), nats/token", yscale="log")
    loops = len(records[0]["loop_agree_teacher"])
    for b in range(loops):
        axes[1].plot(
            x, [100 * r["loop_agree_teacher"][b] for r in records], marker="o", label=f"loop {b}"
        )
    for b in range(loops - 1):
        axes[1].plot(
            x,
            [100 * r["loop_agree_final"][b] for r in records],
            linestyle="--",
            label=f"loop {b} vs final",
        )
    axes[1].set(ylabel="top-1 agreement with teacher, %")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["ppl"] for r in records], marker="o", label="student")
    axes[2].plot(x, [r["teacher_ppl"] for r in records], linestyle=":", label="teacher")
    axes[2].set(ylabel="perplexity", yscale="log")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("training tokens seen")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass
class UptrainPaths:
    """Where a run keeps its files inside ``out``: the final checkpoint at the top level,
    training state, evaluation log, curve and self-distillation cache under ``uptrain/``."""

    out: Path

    @property
    def work(self) -> Path:
        return self.out / "uptrain"

    @property
    def state(self) -> Path:
        return self.work / "state.pt"

    @property
    def log(self) -> Path:
        return self.work / "eval.jsonl"

    @property
    def curve(self) -> Path:
        return self.work / "curve.png"

    @property
    def data_cache(self) -> Path:
        return self.work / "self_distill.jsonl"


def _trim_log(path: Path, step: int) -> None:
    """Drop records logged after the resumed state's step (they will be logged again)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(f"{ln}\n" for ln in keep))


def uptrain_checkpoint(
    student_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    config: UptrainConfig,
    data: DataConfig,
    resume: bool = False,
    plot: bool = True,
    data_cache: str | Path | None = None,
    eval_fidelity: bool = False,
    stop_step: int | None = None,
) -> RunSummary:
    """What ``loopserve uptrain`` runs: load both models, build the data, train, save.

    The output directory becomes a normal loopserve checkpoint (provenance records the run);
    stale exit thresholds are dropped because training changes every loop's confidence.
    ``eval_fidelity`` adds the conversion's fidelity report to every evaluation
    (``training.fidelity_probes``); ``stop_step``: ``Uptrainer.run``'s.
    """
    from model.checkpoint import load_model, read_loopserve_meta, save_checkpoint
    from training.distill_data import build_windows, load_tokenizer

    paths = UptrainPaths(Path(out_dir))
    ranks, device = distributed.init_distributed(config.resolved_device())
    # Every rank decides from the same files before any rank writes one.
    state_exists = paths.state.exists()
    distributed.barrier()
    if state_exists and not resume:
        raise UptrainError(f"{paths.state} exists: pass --resume to continue it, or a new --out")
    student = load_model(student_dir)
    teacher = load_model(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    cache = data_cache or paths.data_cache
    # Rank 0 self-distils (or finds the cache complete); the others then read its cache.
    if not ranks.is_main:
        distributed.barrier()
    progress = config.progress and ranks.is_main
    train, held_out = build_windows(data, tokenizer, teacher_dir, cache, device, progress)
    probes: dict[str, Probe] = {}
    if eval_fidelity:
        from training.fidelity_probes import fidelity_probes

        teacher.to(device)
        probes = fidelity_probes(teacher, teacher_dir, tokenizer, data.seq_len, progress)
    if ranks.is_main:
        distributed.barrier()
    trainer = Uptrainer(student, teacher, train, held_out, config, paths.log, probes)
    if resume and state_exists:
        trainer.load_state(paths.state)
        if ranks.is_main:
            _trim_log(paths.log, trainer.step)
    elif paths.log.exists() and ranks.is_main:
        paths.log.unlink()
    summary = trainer.run(paths.state, stop_step)
    final_state = trainer.full_student_state()
    if not ranks.is_main:
        return summary
    student = load_model(student_dir)  # a plain (unwrapped, unsharded) copy to write
    student.load_state_dict(final_state)
    student.config = replace(student.config, exit_thresholds=None)
    try:
        base = read_loopserve_meta(student_dir).get("provenance", {})
    except FileNotFoundError:
        base = {}
    provenance = {
        **base,
        "uptrain": {
            "student": str(Path(student_dir).resolve()),
            "teacher": str(Path(teacher_dir).resolve()),
            "config": config.to_dict(),
            "data": asdict(data),
            "train_windows": list(train.shape),
            "eval_windows": list(held_out.shape),
            "device": device,
            **summary.to_dict(),
        },
    }
    save_checkpoint(student.cpu(), paths.out, provenance=provenance, tokenizer_from=teacher_dir)
    if plot:
        plot_curve(paths.log, paths.curve, title=f"uptraining {Path(student_dir).name}")
    return summary


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {n}")
    return n


def add_uptrain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``uptrain``: distil a teacher into a converted recursive student checkpoint."""
    d = UptrainConfig()
    p = subparsers.add_parser(
        "uptrain",
        help="knowledge-distil the original model into a recursive conversion",
        description=(
            "Train a converted (student) checkpoint to match its original (teacher): forward "
            "KL on the final loop plus the early-exit term on every intermediate loop. Writes a "
            "loopserve checkpoint to --out, with the evaluation log and curve in --out/uptrain."
        ),
    )
    p.add_argument("--student", required=True, help="converted loopserve checkpoint directory")
    p.add_argument("--teacher", required=True, help="original model directory (Hugging Face)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="text or JSONL files ('text' or chat 'messages' per line)",
    )
    data.add_argument(
        "--self-distill",
        type=int,
        default=0,
        metavar="N",
        help="sample N tokens of continuations of the built-in prompts from the teacher "
        "(cached under --out/uptrain)",
    )
    data.add_argument(
        "--self-distill-cache",
        metavar="FILE",
        help="where generated samples are cached (default: --out/uptrain/self_distill.jsonl); "
        "runs with the same teacher and settings can share one",
    )
    data.add_argument("--gen-len", type=_positive_int, default=256, help="tokens per sample")
    data.add_argument("--gen-batch", type=_positive_int, default=32, help="samples per batch")
    data.add_argument("--gen-temperature", type=float, default=1.0)
    data.add_argument("--gen-top-p", type=float, default=0.95)
    data.add_argument("--seq-len", type=_positive_int, default=256, help="packed window length")
    data.add_argument(
        "--eval-data", metavar="FILE", help="held-out file (default: built-in evaluation text)"
    )
    data.add_argument("--eval-windows", type=_positive_int, default=16)
    data.add_argument(
        "--eval-fidelity",
        action="store_true",
        help="also log, at every evaluation, the fidelity report `loopserve convert` prints "
        "(KL, agreement, perplexity on the built-in text and the held-out samples)",
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=_positive_int, default=d.steps)
    opt.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    opt.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum)
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    opt.add_argument("--warmup", type=int, default=d.warmup_steps, help="warm-up steps")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--clip", type=float, default=d.grad_clip, help="gradient-norm clip")
    opt.add_argument("--temperature", type=float, default=d.temperature, help="KD temperature")
    opt.add_argument("--kd-weight", type=float, default=d.kd_weight, help="final-loop KL")
    opt.add_argument("--ce-weight", type=float, default=d.ce_weight, help="final-loop CE")
    opt.add_argument(
        "--exit-weight",
        type=float,
        default=None,
        help="set both intermediate-loop weights (CE and KD)",
    )
    opt.add_argument("--exit-kd-weight", type=float, default=d.exit_kd_weight)
    opt.add_argument(
        "--exit-warmup",
        type=int,
        default=d.exit_warmup_steps,
        help="steps over which the intermediate-loop weights ramp up from 0 (0: no ramp)",
    )
    opt.add_argument(
        "--loss-chunk",
        type=int,
        default=d.loss_chunk,
        help="tokens per chunk through the exit head (0: all at once, the reference loss)",
    )
    opt.add_argument("--exit-ce-weight", type=float, default=d.exit_ce_weight)
    opt.add_argument(
        "--freeze",
        action="append",
        default=[],
        choices=DEFAULT_GROUPS,
        help="freeze a parameter group (repeatable)",
    )
    opt.add_argument(
        "--train-embeddings", action="store_true", help="also train embeddings / LM head"
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--strategy",
        choices=distributed.STRATEGIES,
        default=d.strategy,
        help="data parallelism under torchrun: ddp (replicated) or fsdp (FSDP2, sharded "
        "parameters, gradients and optimizer state); ignored in one process",
    )
    run.add_argument("--eval-every", type=_positive_int, default=d.eval_every)
    run.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="0: only at the end"
    )
    run.add_argument("--max-minutes", type=float, default=None, help="wall-clock bound")
    run.add_argument(
        "--stop-at-step",
        type=_positive_int,
        metavar="N",
        help="end at step N, the LR schedule still spanning --steps (to match a run that "
        "--max-minutes cut short)",
    )
    run.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--resume", action="store_true", help="continue --out/uptrain/state.pt")
    run.add_argument("--no-plot", action="store_true", help="skip the curve PNG")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", metavar="FILE", help="also write the run summary as JSON")
    p.set_defaults(func=run_uptrain_command)
    return p


def uptrain_config_from_args(args: argparse.Namespace) -> UptrainConfig:
    groups = tuple(g for g in DEFAULT_GROUPS if g not in args.freeze)
    if args.train_embeddings:
        groups += ("embeddings",)
    exit_kd, exit_ce = args.exit_kd_weight, args.exit_ce_weight
    if args.exit_weight is not None:
        exit_kd = exit_ce = args.exit_weight
    return UptrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.clip,
        temperature=args.temperature,
        kd_weight=args.kd_weight,
        ce_weight=args.ce_weight,
        exit_kd_weight=exit_kd,
        exit_ce_weight=exit_ce,
        exit_warmup_steps=args.exit_warmup,
        loss_chunk=args.loss_chunk,
        strategy=args.strategy,
        train_groups=groups,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        max_minutes=args.max_minutes,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )


def run_uptrain_command(args: argparse.Namespace) -> int:
    """Handler of ``loopserve uptrain``."""
    try:
        config = uptrain_config_from_args(args)
        data = DataConfig(
            files=tuple(args.data),
            self_distill_tokens=args.self_distill,
            gen_len=args.gen_len,
            gen_batch_size=args.gen_batch,
            gen_temperature=args.gen_temperature,
            gen_top_p=args.gen_top_p,
            seq_len=args.seq_len,
            eval_file=args.eval_data,
            eval_windows=args.eval_windows,
            seed=args.seed,
        )
        summary = uptrain_checkpoint(
            args.student,
            args.teacher,
            args.out,
            config,
            data,
            resume=args.resume,
            plot=not args.no_plot,
            data_cache=args.self_distill_cache,
            eval_fidelity=args.eval_fidelity,
            stop_step=args.stop_at_step,
        )
    except USER_ERRORS as e:
        print(f"loopserve uptrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        if distributed.current_ranks().distributed and torch_distributed_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()
    if not distributed.current_ranks().is_main:
        return 0
    for line in summary_lines(summary, Path(args.out)):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0


def torch_distributed_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def summary_lines(summary: RunSummary, out: Path) -> list[str]:
    lines = [
        f"trained {summary.step} steps, {summary.tokens_seen:,} tokens in "
        f"{summary.train_seconds:.0f} s ({summary.tokens_per_second:.0f} tokens/s)"
        + (" — stopped before --steps" if summary.stopped_early else "")
    ]
    if summary.peak_memory_bytes:
        lines.append(
            f"{summary.world_size} process(es), {summary.strategy}; peak memory per rank: "
            + ", ".join(f"{b / 2**20:.0f} MiB" for b in summary.peak_memory_bytes)
        )
    if summary.final_eval is not None:
        lines.append(f"held-out: {summary.final_eval.summary()}")
    lines.append(f"wrote {out} (log and curve in {UptrainPaths(out).work})")
    return lines


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``calibrate``: fit per-depth exit thresholds and write them into the checkpoint."""
    p = subparsers.add_parser(
        "calibrate",
        help="fit early-exit confidence thresholds with a guarantee, verify them held out",
        description=(
            "Per loop depth and confidence measure (max prob, top-1 minus top-2 margin), fit "
            "thresholds on the checkpoint's own samples from the calibration prompt set so that "
            "tokens exiting at each depth agree with the full-depth token at least --target of "
            "the time, with probability at least 1 - --delta (fixed-sequence binomial tests); "
            "verify them on samples from the disjoint held-out prompt set and write thresholds "
            "and both reports into loopserve.json."
        ),
    )
    p.add_argument("--model", required=True, help="loopserve checkpoint directory")
    p.add_argument("--target", type=float, default=0.99, help="agreement target (default 0.99)")
    p.add_argument(
        "--delta", type=float, default=DELTA, help=f"failure probability (default {DELTA})"
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help="calibration file instead of self-distilled samples (never the evaluation text)",
    )
    p.add_argument(
        "--tokens", type=_positive_int, default=8192, help="self-distilled calibration tokens"
    )
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--min-loops", type=_positive_int, default=1, help="loops before any exit")
    heads = p.add_argument_group("learned exit heads")
    h = HeadTraining()
    heads.add_argument(
        "--exit-heads",
        action="store_true",
        help="first train one affine exit head per early depth (tuned lens) on half the "
        "calibration windows against the final loop (KL); thresholds use their confidences",
    )
    heads.add_argument("--head-steps", type=_positive_int, default=h.steps)
    heads.add_argument("--head-seconds", type=float, default=h.max_seconds, help="time bound")
    heads.add_argument("--head-batch", type=_positive_int, default=h.batch_tokens, help="tokens")
    heads.add_argument("--head-lr", type=float, default=h.lr)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    p.add_argument("--dry-run", action="store_true", help="print, do not write the config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=run_calibrate_command)
    return p


def run_calibrate_command(args: argparse.Namespace) -> int:
    """Handler of ``loopserve calibrate``."""
    try:
        heads = None
        if args.exit_heads:
            heads = HeadTraining(
                steps=args.head_steps,
                max_seconds=args.head_seconds,
                batch_tokens=args.head_batch,
                lr=args.head_lr,
                progress=not args.no_progress,
            )
        result, report = calibrate_checkpoint(
            args.model,
            target=args.target,
            delta=args.delta,
            data=args.data,
            tokens=args.tokens,
            seq_len=args.seq_len,
            min_loops=args.min_loops,
            write=not args.dry_run,
            device=args.device,
            progress=not args.no_progress,
            heads=heads,
        )
    except USER_ERRORS as e:
        print(f"loopserve calibrate: error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        kl = " ".join(
            f"{a:.3f} -> {b:.3f}" for a, b in zip(report.kl_before, report.kl_after, strict=True)
        )
        print(
            f"exit heads: {report.steps} steps on {report.train_tokens} tokens in "
            f"{report.seconds:.0f} s; held-out KL to the final loop per depth {kl}"
        )
        bce = zip(report.gate_bce, report.constant_bce, strict=True)
        print(
            "exit gates: held-out cross-entropy per depth (constant guess) "
            + " ".join(f"{g:.3f} ({c:.3f})" for g, c in bce)
        )
    for line in result.lines():
        print(line)
    if not args.dry_run:
        print(f"wrote exit thresholds to {Path(args.model) / 'loopserve.json'}")
    if args.json:
        record = {**result.to_dict(), "exit_heads": asdict(report) if report else None}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Add ``uptrain`` or ``calibrate`` to the root's sub-commands."""
    {"uptrain": add_uptrain_parser, "calibrate": add_calibrate_parser}[name](subparsers)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m training.cli uptrain|calibrate ...``)."""
    parser = argparse.ArgumentParser(prog="python -m training.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_uptrain_parser(sub)
    add_calibrate_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
