"""The ``pull`` and ``convert`` commands: import the default model, fold a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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

USER_ERRORS = (ConfigError, CheckpointError, PullError)


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
            "LoRA deltas from the truncated SVD of each layer's residual, write a loopserve "
            "checkpoint and print parameter counts and a fidelity report against the source."
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


def _cmd_convert(args: argparse.Namespace) -> int:
    from model.build import convert_checkpoint, result_dict
    from model.pull import pull_default

    src = pull_default() if args.src == DEFAULT_SPEC else Path(args.src)
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
    )
    for line in result.lines():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result_dict(result), indent=2) + "\n")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from model.default import ensure_default_model
    from model.pull import pull_default

    print(f"source model: {pull_default(force=args.force)}")
    if not args.source_only:
        print(f"default model: {ensure_default_model()}")
    return 0


def _add_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="import the default model (SmolLM2-135M-Instruct) and "
        "build its exact 3-loop conversion",
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
