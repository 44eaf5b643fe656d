"""Linear weights (bf16 or float32) laid out once at load for the CPU path's GEMM.

``F.linear`` on a bf16 CPU weight makes oneDNN reorder the weight into its blocked layout on
every call: a read and a write of the whole weight before the GEMM reads it again. A decode
step is bound by weight bandwidth, so that reorder costs about a third of each linear layer
(measured on a 2-core Xeon with AMX, SmolLM2's 30 layers, one thread: 41 ms a step for 32 rows
through plain ``F.linear``, 27-31 ms through packed weights). Two layouts:

- ``onednn``: oneDNN's own, reordered once; the same kernel, so outputs are bitwise
  ``F.linear``'s. The choice where no panel GEMM takes the weight (no AVX-512 BF16, AMX with
  in-features off a multiple of 32, or the C++ kernels off).
- ``panels``: column panels for the C++ GEMMs (``cpu_kernels.cpp``), where oneDNN streams a
  decode step's weights well below the memory bandwidth. 32 columns wide for the AMX path, the
  choice on CPUs with AMX (measured on a 2-core Xeon, one thread, SmolLM2's linears: 17.0-17.7
  vs 24.8 ms a step at 1 row, 20.2-20.9 vs 28.7 at 32); 64 wide for AVX-512 BF16
  dot products, the choice on CPUs with those but no AMX (a 2-core AMD EPYC: 12 vs 19 ms at
  1 row, 14 vs 23 at 8, 45 vs 45 at 32). Outputs are float32 sums of exact bf16 products
  rounded once, like oneDNN's, in another order: within bf16 rounding of ``F.linear``, and
  the same for a row whatever else is in the batch.

float32 weights take 16-column panels where the build has the AVX2 FMA GEMM: oneDNN's float32
GEMM on a packed weight streams a decode step's weights from memory well below the bandwidth
(measured on a 2-core AMD EPYC with AVX2 only, two threads, SmolLM2's four linear maps a layer
cycling through 30 layers: 1.0 / 1.5 / 2.7 ms a layer at 1 / 8 / 32 rows through oneDNN, 0.5 /
0.7-0.8 / 1.6-2.0 ms on panels). Each output is one float32 FMA chain in input order: within
float32 rounding of ``F.linear`` and the same for a row whatever else is in the batch. Elsewhere
float32 weights take oneDNN's layout: faster than ``F.linear``'s MKL at decode row counts and,
unlike it, batch-invariant too (MKL switches kernels below 4-6 rows; oneDNN at one row, which
``gemm_rows`` pads to two).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

from loopserve_kernels.cpu_kernels import (
    amx_takes,
    cpu_kernel_available,
    packed_linear_cpu,
    panel_f32_built,
    panel_gemm_cpu,
    panel_gemm_f32_cpu,
    panel_width,
)
from loopserve_kernels.dispatch import cpu_kernel_mode

Layout = Literal["onednn", "panels"]
PANEL = 64
"""Output columns per panel of the dot-product GEMM (in-features even); the AMX GEMM's panels
are ``TILE_PANEL`` wide (in-features a multiple of 32)."""
TILE_PANEL = 32
F32_PANEL = 16
"""Output columns per panel of the float32 GEMM (two AVX2 registers)."""

PACK_BATCH_HINT = 32
"""The row count oneDNN picks the packed layout for; outputs are the same for any count."""

GEMM_PIECE = 512
"""The most rows one oneDNN call takes (``gemm_rows``)."""


def gemm_rows(rows: int) -> int:
    """The row count oneDNN's GEMM is called with for ``rows`` (at most ``GEMM_PIECE``) rows.

    oneDNN builds and caches a JIT-compiled primitive for every row count it meets, about half
    a MiB each in two 1,024-entry caches: serving every count from 1 to a few thousand grew a
    server by hundreds of MiB and cost ~1 ms a new count. Padding to exact counts up to 16, then
    4 an octave (at most 1/4 more rows), keeps it to 36 counts a weight shape (8 an octave
    still grew the soak server by ~70 MiB after its warm-up). One row is padded to two: on an
    AVX-512 AMD EPYC, oneDNN's float32 GEMM takes another kernel for a single row whose sums
    differ in the last bits from every other count's (a 576 x 1536 weight), so a row alone
    would not get the bits it gets in a batch. The C++ layer's ``gemm_rows`` is the same rule
    (tested); a row's result does not depend on the others.
    """
    if not 0 <= rows <= GEMM_PIECE:
        raise ValueError(f"gemm_rows takes 0..{GEMM_PIECE} rows, got {rows}")
    if rows <= 16:
        return 2 if rows == 1 else rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` through oneDNN in pieces of padded row counts (``gemm_rows``)."""
    if x.shape[0] > GEMM_PIECE:
        return torch.cat([onednn_linear(piece, packed) for piece in x.split(GEMM_PIECE)])
    count = x.shape[0]
    rows = gemm_rows(count)
    if rows != count:
        x = torch.cat([x, x.new_zeros((rows - count, x.shape[1]))])
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")[:count]


@cache
def _bf16_gemm_supported() -> bool:
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed: a 2-D CPU tensor, float32 (oneDNN built) or bf16 on
    a CPU with native bf16."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.dtype == torch.float32:
        return torch.backends.mkldnn.is_available()
    return weight.dtype == torch.bfloat16 and _bf16_gemm_supported()


def panels_fit(weight: torch.Tensor, width: int = PANEL) -> bool:
    """Whether ``weight [out, in]`` has the shape of ``width``-column panels (bf16 ones hold
    input pairs)."""
    pairs = weight.dtype != torch.float32
    return weight.shape[0] % width == 0 and (not pairs or weight.shape[1] % 2 == 0)


def machine_panel_width(weight: torch.Tensor) -> int:
    """The panel width this machine's C++ GEMM runs fastest for ``weight [out, in]`` (0: none,
    oneDNN's layout is faster or the kernels are off)."""
    if cpu_kernel_mode(weight) == "off" or not cpu_kernel_available():
        return 0
    if weight.dtype == torch.float32:
        return F32_PANEL if panel_f32_built() else 0
    return panel_width(weight.shape[1]) if weight.dtype == torch.bfloat16 else 0


def preferred_layout(weight: torch.Tensor) -> Layout:
    """Panels where they fit and are this machine's faster GEMM (float32 with AVX2 FMA, the
    AMX path, or AVX-512 BF16 without AMX), else oneDNN's layout."""
    width = machine_panel_width(weight)
    return "panels" if width and panels_fit(weight, width) else "onednn"


def to_panels(weight: torch.Tensor, width: int = PANEL) -> torch.Tensor:
    """bf16 ``[out, in]`` -> ``[out/width, in/2, width, 2]``: per panel and input pair, the
    panel's outputs' two weights side by side (what a dot-product instruction or an AMX B tile
    row reads); float32 -> ``[out/width, in, width]``: per input, the panel's outputs."""
    out_f, in_f = weight.shape
    if weight.dtype == torch.float32:
        return weight.reshape(out_f // width, width, in_f).transpose(1, 2).contiguous()
    return weight.reshape(out_f // width, width, in_f // 2, 2).transpose(1, 2).contiguous()


def from_panels(panels: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_panels``."""
    if panels.dim() == 3:
        count, in_f, width = panels.shape
        return panels.transpose(1, 2).reshape(count * width, in_f)
    count, pairs, width = panels.shape[:3]
    return panels.transpose(1, 2).reshape(count * width, 2 * pairs)


@dataclass(frozen=True)
class PackedWeight:
    """An ``[out, in]`` weight in a GEMM's layout: oneDNN's blocked one (an opaque mkldnn
    tensor) or column panels (``to_panels``)."""

    packed: torch.Tensor
    out_features: int
    in_features: int
    layout: Layout = "onednn"
    dtype: torch.dtype = torch.bfloat16

    @staticmethod
    def pack(
        weight: torch.Tensor, layout: Layout | None = None, width: int | None = None
    ) -> PackedWeight:
        """``layout``: the machine's preferred one by default; ``width`` of panels: the
        machine's (or the dot-product GEMM's where it has none for this weight)."""
        if not packing_supported(weight):
            raise ValueError(
                f"cannot pack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device}: "
                "packing needs a 2-D CPU weight, float32 (oneDNN built) or bfloat16 on a CPU "
                "with native bf16 GEMMs"
            )
        out_f, in_f = weight.shape
        layout = layout or preferred_layout(weight)
        if layout == "panels":
            if weight.dtype == torch.float32:
                if width not in (None, F32_PANEL) or not panel_f32_built():
                    raise ValueError(
                        f"float32 panels are {F32_PANEL} columns wide and need the C++ kernels "
                        f"built with AVX2 and FMA (width {width}, built: {panel_f32_built()})"
                    )
                width = F32_PANEL
            width = width or machine_panel_width(weight) or PANEL
            if not panels_fit(weight, width):
                raise ValueError(
                    f"a {tuple(weight.shape)} weight has no panel layout: out-features must "
                    f"divide by {width} and in-features by 2"
                )
            if width == TILE_PANEL and not amx_takes(in_f):
                raise ValueError(
                    f"{TILE_PANEL}-column panels need AMX and in-features divisible by 32, "
                    f"got {in_f}"
                )
            panels = to_panels(weight.contiguous(), width)
            return PackedWeight(panels, out_f, in_f, "panels", weight.dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
        return PackedWeight(packed, out_f, in_f, "onednn", weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in] @ weightᵀ`` -> ``[T, out]`` in the weight's dtype."""
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != self.dtype:
            raise ValueError(
                f"x must be {self.dtype} [T, {self.in_features}], got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        if self.layout == "panels":
            gemm = panel_gemm_f32_cpu if self.dtype == torch.float32 else panel_gemm_cpu
            return gemm(x, self.packed)
        if cpu_kernel_available():
            return packed_linear_cpu(x, self.packed)
        return onednn_linear(x, self.packed)
