"""``loopserve serve`` shortens OpenMP's spin before libgomp loads, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopserve.openmp import SERVE_SPINCOUNT, apply_serving_default

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_is_set_only_where_the_user_set_nothing() -> None:
    env: dict[str, str] = {}
    assert apply_serving_default(env) and env == {"GOMP_SPINCOUNT": SERVE_SPINCOUNT}
    for knob in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(knob)
        assert not apply_serving_default(env) and env == knob


@pytest.mark.parametrize(("command", "want"), [("serve", SERVE_SPINCOUNT), ("pull", "None")])
def test_serve_sets_it_before_torch_loads(command: str, want: str) -> None:
    """In a fresh interpreter, as the console script runs: torch is not loaded until the
    sub-command's module is, so libgomp starts with the value."""
    code = (
        "import os, sys\n"
        "from loopserve.cli import main\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == want
