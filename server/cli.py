"""The ``serve`` command: settings from flags and environment, the engine, the HTTP server."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from model.checkpoint import CheckpointError
from model.config import ConfigError
from scheduler.config import BATCHING_MODES, DEPTH_ALIGNMENTS, KV_FILL_MODES
from server.settings import ServeConfigError
from server.tool_parsers import PARSERS

USER_ERRORS = (ConfigError, CheckpointError, ServeConfigError, ValidationError)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.app import create_app
    from server.drain import DrainingServer
    from server.loader import build_engine
    from server.settings import ServeSettings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "model_tag")}
    tag = getattr(args, "model_tag", None)
    if tag is not None:
        if "model" in overrides and overrides["model"] != tag:
            raise ServeConfigError(f"two models given: {tag!r} and --model {overrides['model']!r}")
        overrides["model"] = tag
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


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    """Add ``serve`` to the root's sub-commands."""
    p = sub.add_parser(
        name,
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
    opt(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="the model, as `vllm serve MODEL` takes it (the same as --model)",
    )
    opt("--model", help="model directory, or 'default' (built on first use; the default)")
    opt("--host", help="address to bind (default: 127.0.0.1)")
    opt("--port", type=int, help="port (default: 8000)")
    opt("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    opt("--served-model-name", help="the model's name in the API (default: its directory name)")
    opt("--batching", choices=BATCHING_MODES, help="depth-wise or sequence-wise (default: depth)")
    opt(
        "--depth-alignment",
        choices=DEPTH_ALIGNMENTS,
        help="depth mode: run rows at mixed depths, or hold rows so a step runs one depth (all "
        "loops, where no row can exit early; default: auto = aligned for dense per-depth weights)",
    )
    opt("--exit-threshold", type=float, help="early-exit confidence threshold (> 1: off)")
    opt(
        "--exit-measure",
        choices=("prob", "margin", "gate"),
        help="exit confidence: max probability, top-2 margin, or the learned gate (needs exit "
        "heads; decided before the LM head); calibrated thresholds of that measure apply "
        "(default: prob)",
    )
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
    opt("--header-timeout", type=float, help="seconds a client has to send headers (default: 10)")
    opt("--body-timeout", type=float, help="seconds a client has to send the body (default: 30)")
    opt("--log-interval", type=float, help="seconds between engine summaries (default: 10)")
    opt("--shutdown-grace", type=float, help="seconds to drain on shutdown (default: 30)")
    opt("--seed", type=int, help="seed of unseeded sampling (default: 0)")
    opt("--chat-template", help="chat template file (or Jinja text) replacing the model's")
    opt(
        "--enable-prefix-caching",
        action="store_true",
        help="share full prompt blocks across requests (default: off)",
    )
    opt(
        "--compile",
        action="store_true",
        help="compile the block pass (torch.compile, rows padded to fixed buckets; CUDA graphs "
        "on a GPU, untested there); off by default: on the CPU the C++ decode layer already "
        "runs one call per layer, and compiling drops its packed weights (default: off)",
    )
    opt(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let tool_choice 'auto' (the default with tools) through, the model's own calls "
        "read by --tool-call-parser (default: off: 400)",
    )
    opt("--tool-call-parser", choices=PARSERS, help="the model's tool-call format (hermes)")
    opt(
        "--generation-config",
        choices=("auto", "vllm"),
        help="auto: the model's generation_config.json gives EOS ids and the sampling defaults "
        "of fields a request leaves out; vllm: ignore it (default: auto)",
    )
    p.set_defaults(func=_cmd_serve)
