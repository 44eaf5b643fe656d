"""The ``bench`` command: ``bench serve`` load-tests a server, ``bench compare`` sweeps several."""

from __future__ import annotations

import argparse

from benchmarks.client.cli import add_serve_parser
from benchmarks.client.datasets import BenchError
from benchmarks.compare import add_compare_parser

USER_ERRORS = (BenchError,)


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    """Add ``bench`` (with its own ``serve`` and ``compare``) to the root's sub-commands."""
    p = sub.add_parser(name, help="load-test servers: one (serve) or side by side (compare)")
    bench = p.add_subparsers(dest="bench", required=True)
    add_serve_parser(bench)
    add_compare_parser(bench)
