"""bf16 linear weights laid out once at load for the CPU path's GEMM.

``F.linear`` on a bf16 CPU weight makes oneDNN reorder the weight into its blocked layout on
every call: a read and a write of the whole weight before the GEMM reads it again. A decode
step is bound by weight bandwidth, so that reorder costs about a third of each linear layer
(measured on a 2-core Xeon with AMX, SmolLM2's 30 layers, one thread: 41 ms a step for 32 rows
through plain ``F.linear``, 27-31 ms through packed weights). Two layouts:

- ``onednn``: oneDNN's own, reordered once; the same kernel, so outputs are bitwise
  ``F.linear``'s. The choice on CPUs with AMX.
- ``panels``: 64-column panels for the C++ AVX-512 BF16 GEMM (``cpu_kernels.cpp``), the choice
  on CPUs with AVX-512 BF16 but no AMX, where oneDNN reaches about half the memory bandwidth
  at decode row counts (measured on a 2-core AMD EPYC, one thread, SmolLM2's linears: 19 vs
  12 ms a step at 1 row, 23 vs 14 ms at 8, 45 vs 45 ms at 32). Outputs are float32 sums of
  exact bf16 products rounded once, like oneDNN's, in another order: within bf16 rounding of
  ``F.linear``, and the same for a row whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from kernels.cpu_kernels import cpu_kernel_available, panel_gemm_cpu, panels_preferred
from kernels.dispatch import cpu_kernel_mode

Layout = Literal["onednn", "panels"]
PANEL = 64
"""Output columns per panel: weights whose out-features divide by it (and whose in-features
are even) can take the panel layout."""

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


def panels_fit(weight: torch.Tensor) -> bool:
    """Whether ``weight [out, in]`` has the panel layout's shape."""
    return weight.shape[0] % PANEL == 0 and weight.shape[1] % 2 == 0


def preferred_layout(weight: torch.Tensor) -> Layout:
    """Panels where they fit and are this machine's faster GEMM (C++ kernels on, built with
    AVX-512 BF16, no AMX), else oneDNN's layout."""
    on = cpu_kernel_mode(weight) != "off" and cpu_kernel_available()
    return "panels" if on and panels_fit(weight) and panels_preferred() else "onednn"


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> ``[out/64, in/2, 64, 2]``: per panel and input pair, the 64 outputs'
    two weights side by side (what one AVX-512 BF16 dot-product instruction reads)."""
    out_f, in_f = weight.shape
    return weight.reshape(out_f // PANEL, PANEL, in_f // 2, 2).transpose(1, 2).contiguous()


def from_panels(panels: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_panels``."""
    count, pairs = panels.shape[:2]
    return panels.transpose(1, 2).reshape(count * PANEL, 2 * pairs)


@dataclass(frozen=True)
class PackedWeight:
    """An ``[out, in]`` weight in a GEMM's layout: oneDNN's blocked one (an opaque mkldnn
    tensor) or 64-column panels."""

    packed: torch.Tensor
    out_features: int
    in_features: int
    layout: Layout = "onednn"

    @staticmethod
    def pack(weight: torch.Tensor, layout: Layout | None = None) -> PackedWeight:
        """``layout``: the machine's preferred one by default."""
        if not packing_supported(weight):
            raise ValueError(
                f"cannot pack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device}: "
                "packing needs a 2-D bfloat16 CPU weight and a CPU with native bf16 GEMMs"
            )
        out_f, in_f = weight.shape
        layout = layout or preferred_layout(weight)
        if layout == "panels":
            if not panels_fit(weight):
                raise ValueError(
                    f"a {tuple(weight.shape)} weight has no panel layout: out-features must "
                    f"divide by {PANEL} and in-features by 2"
                )
            return PackedWeight(to_panels(weight.contiguous()), out_f, in_f, "panels")
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
        return PackedWeight(packed, out_f, in_f, "onednn")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in] @ weightᵀ`` -> ``[T, out]`` (bf16)."""
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.bfloat16:
            raise ValueError(
                f"x must be bfloat16 [T, {self.in_features}], got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        if self.layout == "panels":
            return panel_gemm_cpu(x, self.packed)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
