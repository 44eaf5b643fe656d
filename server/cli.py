"""The ``loopserve`` command line: model preparation now, serving and benchmarks as they land."""

from __future__ import annotations

import argparse
import json
import sys
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

DEFAULT_MODEL = "default"


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


def _cmd_convert(args: argparse.Namespace) -> int:
    from model.build import convert_checkpoint, result_dict
    from model.pull import pull_default

    src = pull_default() if args.src == DEFAULT_MODEL else Path(args.src)
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


def _cmd_serve(args: argparse.Namespace) -> int:
    from model.default import ensure_default_model

    model_dir = ensure_default_model() if args.model == DEFAULT_MODEL else Path(args.model)
    print(f"model ready: {model_dir}")
    print("the HTTP server is not built yet (issue 5); stopping after the model build.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pull = sub.add_parser(
        "pull",
        help="import the default model (SmolLM2-135M-Instruct) and "
        "build its exact 3-loop conversion",
    )
    pull.add_argument("--force", action="store_true", help="re-import even if present")
    pull.add_argument(
        "--source-only",
        action="store_true",
        help="import the source model only, skip the default conversion",
    )
    _add_convert(sub)
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="model directory or 'default'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"pull": _cmd_pull, "convert": _cmd_convert, "serve": _cmd_serve}
    try:
        return handlers[args.command](args)
    except (ConfigError, CheckpointError) as e:  # user-facing: a message, not a traceback
        print(f"loopserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
