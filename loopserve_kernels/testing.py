"""Helpers shared by the kernel tests and the GPU check: verbose comparisons, interpreter setup.

Tolerances follow STYLE.md: fp32 kernels are held to a relative bound against a float64
golden; low-precision kernels to ``2 × (eager low-precision error) + 1e-6``, because a fixed
tolerance is either too loose to catch bugs or flaky across shapes.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

FP32_RTOL = 1e-5
LOWP_FACTOR = 2.0
LOWP_EPS = 1e-6


def check_device() -> torch.device:
    """CUDA when present, else the CPU (the Triton kernels then run in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_triton_python(name: str) -> bool:
    return (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")


@contextmanager
def triton_kernels(*names: str) -> Iterator[list[ModuleType]]:
    """Import Triton kernel modules so they run here: compiled on a GPU, interpreted otherwise.

    ``@triton.jit`` (triton's own ``tl.max``/``tl.cdiv`` included) reads ``TRITON_INTERPRET``
    when the decorator runs, and torch/transformers import triton early in a test session. So
    on a CPU the Python layer of triton is imported afresh with the variable set (its C
    extension cannot be loaded twice and is kept), and everything is put back on exit.
    """
    if torch.cuda.is_available():
        yield [importlib.import_module(n) for n in names]
        return
    saved = {n: m for n, m in sys.modules.items() if _is_triton_python(n) or n in names}
    for n in saved:
        del sys.modules[n]
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield [importlib.import_module(n) for n in names]
    finally:
        fresh = [
            sys.modules.pop(n) for n in list(sys.modules) if _is_triton_python(n) or n in names
        ]
        sys.modules.update(saved)
        for module in fresh:  # break the copy's cycles so it is freed before the C extension
            vars(module).clear()
        gc.collect()
        if old_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def max_abs_error(actual: torch.Tensor, golden: torch.Tensor) -> float:
    """Largest elementwise |actual - golden|, computed in float64 on the CPU (inf if non-finite)."""
    diff = (actual.detach().double().cpu() - golden.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0
    return float("inf") if not torch.isfinite(diff).all() else float(diff.max())


def assert_close_verbose(
    actual: torch.Tensor, golden: torch.Tensor, bound: float, name: str = "output"
) -> None:
    """Fail if any |actual - golden| exceeds ``bound``, reporting count, first indices, NaN/inf."""
    if actual.shape != golden.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(golden.shape)}")
    a = actual.detach().double().cpu()
    g = golden.detach().double().cpu()
    nan, inf = int(a.isnan().sum()), int(a.isinf().sum())
    diff = (a - g).abs()
    bad = ~(diff <= bound)  # NaN differences count as bad
    count = int(bad.sum())
    if count == 0:
        return
    idx = bad.nonzero()[:5].tolist()
    pairs = ", ".join(
        f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {g[tuple(i)].item():.6g}" for i in idx
    )
    finite = diff[torch.isfinite(diff)]
    worst = float(finite.max()) if finite.numel() else float("nan")
    raise AssertionError(
        f"{name}: {count}/{a.numel()} elements beyond bound {bound:.3g} "
        f"(max finite err {worst:.3g}, NaN {nan}, inf {inf}); first {pairs}"
    )


def fp32_bound(golden: torch.Tensor) -> float:
    """Absolute bound for fp32 kernels: ``FP32_RTOL`` relative to the output's largest value."""
    return FP32_RTOL * (float(golden.detach().abs().max()) if golden.numel() else 0.0)


def lowp_bound(eager: torch.Tensor, golden: torch.Tensor) -> float:
    """Absolute bound for fp16/bf16 kernels: twice the eager low-precision error, plus ε."""
    return LOWP_FACTOR * max_abs_error(eager, golden) + LOWP_EPS
