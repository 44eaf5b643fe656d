"""The ``loopserve`` command line: pull, convert, uptrain, calibrate, serve and bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from benchmarks.client.datasets import BenchError
from model.calibrate import CalibrationError
from model.checkpoint import CheckpointError
from model.config import (
    ATTN_MODULES,
    FULL_RANK,
    INIT_METHODS,
    LINEAR_MODULES,
    MLP_MODULES,
    ConfigError,
)
from model.distill_data import DataError
from model.pull import PullError
from model.train_cli import add_calibrate_parser, add_uptrain_parser
from model.uptrain import UptrainError
from scheduler.config import BATCHING_MODES, DEPTH_ALIGNMENTS, KV_FILL_MODES
from server.settings import DEFAULT_MODEL, ServeConfigError


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
    import logging

    import uvicorn

    from server.app import create_app
    from server.drain import DrainingServer
    from server.loader import build_engine
    from server.settings import ServeSettings

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    settings = ServeSettings(**overrides)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine, tokenizer, info = build_engine(settings)
    app = create_app(engine, tokenizer, info, settings)
    # one line per request comes from loopserve itself; uvicorn's access log would double it
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, access_log=False, log_config=None
    )
    server = DrainingServer(config, engine, settings.shutdown_grace)
    server.run()
    return 0 if server.started else 1


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve a model with continuous depth-wise batching behind an OpenAI-compatible API. "
            "Every option can also be set as an environment variable LOOPSERVE_<OPTION> "
            "(e.g. LOOPSERVE_PORT=8080); flags win. Early exit stays off unless the "
            "checkpoint carries calibrated thresholds, --exit-threshold is given, or a "
            "request asks for it."
        ),
        argument_default=argparse.SUPPRESS,
    )
    opt = p.add_argument
    opt("--model", help="model directory, or 'default' (built on first use; the default)")
    opt("--host", help="address to bind (default: 127.0.0.1)")
    opt("--port", type=int, help="port (default: 8000)")
    opt("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    opt("--served-model-name", help="the model's name in the API (default: its directory name)")
    opt("--batching", choices=BATCHING_MODES, help="depth-wise or sequence-wise (default: depth)")
    opt(
        "--depth-alignment",
        choices=DEPTH_ALIGNMENTS,
        help="depth mode: run rows at mixed depths, or hold rows so a step runs one depth "
        "(default: auto = aligned for dense per-depth weights)",
    )
    opt("--exit-threshold", type=float, help="early-exit confidence threshold (> 1: off)")
    opt("--min-loops", type=int, help="loops every token runs before it may exit (default: 1)")
    opt("--kv-fill", choices=KV_FILL_MODES, help="K/V for skipped depths (default: propagate)")
    opt("--max-num-seqs", type=int, help="most sequences running at once (default: 64)")
    opt("--max-num-batched-tokens", type=int, help="token budget of one step (default: 512)")
    opt("--kv-cache-memory", help="KV cache size, e.g. 512MiB or 2GiB (default: 512MiB)")
    opt("--block-size", type=int, help="tokens per KV block (default: 16)")
    opt("--max-model-len", type=int, help="context length (default: the model's)")
    opt("--max-queue", type=int, help="waiting requests before 429 (default: 256)")
    opt("--dtype", choices=("float32", "bfloat16", "float16"), help="weights and KV dtype")
    opt("--device", help="torch device (default: cpu)")
    opt("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    opt("--max-body-bytes", help="largest request body, e.g. 4MiB (default: 4MiB)")
    opt("--log-interval", type=float, help="seconds between engine summaries (default: 10)")
    opt("--shutdown-grace", type=float, help="seconds to drain on shutdown (default: 30)")
    opt("--seed", type=int, help="seed of unseeded sampling (default: 0)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from benchmarks.client.cli import add_serve_parser
    from benchmarks.compare import add_compare_parser

    p = sub.add_parser("bench", help="load-test servers: one (serve) or side by side (compare)")
    bench = p.add_subparsers(dest="bench", required=True)
    add_serve_parser(bench)
    add_compare_parser(bench)


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
    _add_serve(sub)
    add_uptrain_parser(sub)
    add_calibrate_parser(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"pull": _cmd_pull, "convert": _cmd_convert, "serve": _cmd_serve}
    handler = handlers.get(args.command) or args.func
    try:
        return handler(args)
    except (
        ConfigError,
        CheckpointError,
        ServeConfigError,
        ValidationError,
        PullError,
        UptrainError,
        CalibrationError,
        DataError,
        BenchError,
    ) as e:
        # user-facing: a message, not a traceback
        print(f"loopserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
