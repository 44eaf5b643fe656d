"""The ``loopserve`` command line: the root of every sub-command.

It lives in its own package, above ``server``, ``training``, ``benchmarks`` and ``model``,
because it is the one place that knows them all. It imports only the module of the
sub-command that runs: ``loopserve serve`` loads neither the trainer nor the load-test client,
and ``loopserve --help`` loads none of them. Each sub-command module offers
``add_parser(subparsers, name)`` (which sets ``func``) and ``USER_ERRORS``, the exceptions that
mean bad input and print as one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from loopserve.openmp import apply_serving_default

COMMANDS: dict[str, tuple[str, str]] = {
    "pull": (
        "model.cli",
        "import the default model (SmolLM2-135M-Instruct) and build its exact 3-loop conversion",
    ),
    "convert": ("model.cli", "fold a pretrained checkpoint into a Relaxed Recursive Transformer"),
    "serve": ("server.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "uptrain": ("training.cli", "distil the source model into a converted checkpoint"),
    "calibrate": ("training.cli", "fit early-exit thresholds for a checkpoint"),
    "bench": ("benchmarks.cli", "load-test servers: one (serve) or side by side (compare)"),
}


def _chosen(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, object | None]:
    """The parser for ``argv``: the chosen sub-command in full, the others by name and help."""
    parser = argparse.ArgumentParser(prog="loopserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    module = None
    for name, (module_name, summary) in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_parser(sub, name)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _chosen(argv) == "serve" and "torch" not in sys.modules:
        apply_serving_default(os.environ)  # before the server's imports load libgomp
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    errors = getattr(module, "USER_ERRORS", ())
    try:
        return args.func(args)
    except errors as e:
        print(f"loopserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
