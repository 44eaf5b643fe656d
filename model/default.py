"""The default served model: SmolLM2-135M-Instruct folded into 3 loops at full rank.

Full rank makes the conversion exact (same tokens as the original) while exercising every
recursive code path; compact ranks need uptraining before they answer right (DESIGN.md §6).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model.build import convert_checkpoint
from model.checkpoint import LOOPSERVE_CONFIG
from model.config import FULL_RANK, LINEAR_MODULES
from model.pull import loopserve_home, pull_default

DEFAULT_SPEC = "default"  # what a user types for this model: `--model default`
DEFAULT_MODEL_NAME = "smollm2-135m-rrt3-exact"
DEFAULT_LOOPS = 3
DEFAULT_INIT = "average"


def default_model_dir(home: Path | None = None) -> Path:
    return (home or loopserve_home()) / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(home: Path | None = None, evaluate: bool = True) -> Path:
    """Pull the source and build the exact 3-loop conversion once; later calls return at once."""
    out = default_model_dir(home)
    if (out / LOOPSERVE_CONFIG).exists():
        return out
    src = pull_default(home)
    tmp = out.with_name(out.name + ".partial")
    result = convert_checkpoint(
        src,
        tmp,
        loops=DEFAULT_LOOPS,
        init=DEFAULT_INIT,
        ranks=dict.fromkeys(LINEAR_MODULES, FULL_RANK),
        evaluate=evaluate,
    )
    for line in result.lines():
        print(line, flush=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
