"""Resident memory of a model as the engine serves it: load, apply the serving transforms, read
the process RSS. One process per model, so the numbers do not share an allocator.

    python -m benchmarks.serving_rss vanilla   # the pulled SmolLM2-135M-Instruct
    python -m benchmarks.serving_rss exact     # the default exact B = 3 conversion
"""

from __future__ import annotations

import gc
import sys

import psutil
import torch

from model.checkpoint import load_model
from model.default import ensure_default_model
from model.pull import pull_default
from model.serving import prepare_for_serving


def main(argv: list[str] | None = None) -> int:
    which = (argv or sys.argv[1:] or ["vanilla"])[0]
    model = load_model(  # as the server loads it
        pull_default() if which == "vanilla" else ensure_default_model(),
        dtype=torch.bfloat16,
        keep_full_precision=True,
    )
    prepare_for_serving(model)
    gc.collect()
    print(f"{which}: RSS {psutil.Process().memory_info().rss / 2**20:.1f} MiB (bfloat16, served)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
