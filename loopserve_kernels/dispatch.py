"""The one place that decides which implementation a kernel call runs.

Callers never branch on the device: they call the entry points in ``loopserve_kernels`` and this
module picks Triton for CUDA tensors and, on the CPU, the C++ kernel where one exists (paged decode
attention) and the pure-torch twin otherwise. ``use_backend`` forces a backend for the code it wraps
— in this thread or task only (a context variable, not a process-wide switch), so a trainer forcing
the torch twins (they have autograd) never changes what an engine thread beside it runs. Forcing
``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (how the tests run the kernels on
a CPU).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Literal

import torch

Backend = Literal["triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "cpp")
_forced: ContextVar[str] = ContextVar("loopserve_kernel_backend", default="auto")


@cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is Linux x86_64 only)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels defined from now on run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextmanager
def use_backend(mode: str) -> Iterator[None]:
    """Run the kernel calls inside the ``with`` block on ``mode`` (auto | triton | torch | cpp;
    ``cpp`` runs the C++ CPU kernels where they exist and the torch twins elsewhere)."""
    if mode not in BACKENDS:
        raise ValueError(f"kernel backend {mode!r}; expected one of {', '.join(BACKENDS)}")
    token = _forced.set(mode)
    try:
        yield
    finally:
        _forced.reset(token)


def kernel_backend(x: torch.Tensor) -> Backend:
    """Backend for a call whose main input is ``x``: the forced one, else by device. The torch
    twins while torch.compile traces (``model.compiled_block``): inductor writes its own
    kernels from their ops, where a Triton launcher's host-side logic would break the graph."""
    if torch.compiler.is_compiling():
        return "torch"
    mode = _forced.get()
    if mode in ("torch", "cpp"):
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' forced but triton is not installed")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"kernel backend 'triton' on {x.device} tensors needs TRITON_INTERPRET=1 (or CUDA)"
            )
        return "triton"
    return "triton" if x.is_cuda and triton_available() else "torch"


def cpu_kernel_mode(x: torch.Tensor) -> Literal["off", "prefer", "require"]:
    """Whether a call on ``x`` runs a C++ CPU kernel: ``prefer`` for CPU tensors by default
    (the twin if the kernel did not build, which its loader logs), ``require`` when ``cpp`` is
    forced (a kernel that did not build is an error), ``off`` otherwise — and for float64,
    which the kernels would compute in float32, and while torch.compile traces (a C++ call is
    opaque to it)."""
    if x.device.type != "cpu" or x.dtype == torch.float64 or torch.compiler.is_compiling():
        return "off"
    return {"auto": "prefer", "cpp": "require"}.get(_forced.get(), "off")
