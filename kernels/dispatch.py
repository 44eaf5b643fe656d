"""The one place that decides which implementation a kernel call runs.

Callers never branch on the device: they call the entry points in ``kernels`` and this module
picks Triton for CUDA tensors and the pure-torch twin otherwise. ``LOOPSERVE_KERNELS`` forces
a backend (``triton`` | ``torch`` | ``auto``, default ``auto``); forcing ``triton`` on CPU
tensors only works under ``TRITON_INTERPRET=1`` (how the tests run the kernels on a CPU).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import Literal

import torch

Backend = Literal["triton", "torch"]
ENV_VAR = "LOOPSERVE_KERNELS"
_MODES = ("auto", "triton", "torch")


@cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is Linux x86_64 only)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels defined from now on run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_backend(x: torch.Tensor) -> Backend:
    """Backend for a call whose main input is ``x``: the env override, else by device."""
    mode = os.environ.get(ENV_VAR, "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}; expected one of {', '.join(_MODES)}")
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but the triton package is not installed")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"{ENV_VAR}=triton on {x.device} tensors needs TRITON_INTERPRET=1 (or CUDA)"
            )
        return "triton"
    return "triton" if x.is_cuda and triton_available() else "torch"
