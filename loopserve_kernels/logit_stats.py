"""Per-row statistics of a step's logits: the first argmax, the max and the log-sum-exp.

Greedy tokens (argmax), their logprobs (max − lse) and the max-probability exit confidence
(exp(max − lse)) all follow from these three, so the end of a step reads the [R, V] logits
once or twice instead of upcasting them and softmaxing them per consumer.
"""

from __future__ import annotations

import torch

from loopserve_kernels.cpu_kernels import cpu_kernel_available, row_max_lse_cpu
from loopserve_kernels.dispatch import cpu_kernel_mode


def row_max_lse_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin: float32 max (first index on ties) and logsumexp."""
    x = logits.float()
    top, argmax = x.max(-1)
    return argmax, top, x.logsumexp(-1)


def row_max_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [R, V]`` (any float dtype) -> (argmax int64 [R], max float32 [R], lse float32
    [R]); the C++ kernel on the CPU, torch elsewhere."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [R, V] with V > 0, got {tuple(logits.shape)}")
    mode = cpu_kernel_mode(logits)
    if mode == "require" or (mode == "prefer" and cpu_kernel_available()):
        return row_max_lse_cpu(logits if logits.stride(1) == 1 else logits.contiguous())
    return row_max_lse_ref(logits)
