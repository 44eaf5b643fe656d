"""bf16 linear weights reordered once for oneDNN, the CPU path's GEMM.

``F.linear`` on a bf16 CPU weight makes oneDNN reorder the weight into its blocked layout on
every call: a read and a write of the whole weight before the GEMM reads it again. A decode
step is bound by weight bandwidth, so that reorder costs about a third of each linear layer
(measured on a 2-core Xeon with AMX, SmolLM2's 30 layers, one thread: 41 ms a step for 32 rows
through plain ``F.linear``, 27-31 ms through packed weights). Packing once at load time keeps
the same oneDNN kernel, so the outputs are bitwise those of ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

PACK_BATCH_HINT = 32
"""The row count oneDNN picks the packed layout for; outputs are the same for any count."""


@cache
def _bf16_gemm_supported() -> bool:
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed: a 2-D bf16 CPU tensor on a CPU with native bf16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and _bf16_gemm_supported()
    )


@dataclass(frozen=True)
class PackedWeight:
    """An ``[out, in]`` weight in oneDNN's blocked layout (an opaque mkldnn tensor)."""

    packed: torch.Tensor
    out_features: int
    in_features: int

    @staticmethod
    def pack(weight: torch.Tensor) -> PackedWeight:
        if not packing_supported(weight):
            raise ValueError(
                f"cannot pack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device}: "
                "packing needs a 2-D bfloat16 CPU weight and a CPU with native bf16 GEMMs"
            )
        out_f, in_f = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
        return PackedWeight(packed, out_f, in_f)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in] @ weightᵀ`` -> ``[T, out]`` (bf16)."""
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.bfloat16:
            raise ValueError(
                f"x must be bfloat16 [T, {self.in_features}], got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
