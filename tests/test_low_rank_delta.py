"""The C++ low-rank GEMM of float32 deltas (``TransposedDelta``, ``add_low_rank`` in
``loopserve_kernels/cpu_kernels.cpp``): within float32 rounding of a float64 reference, each
row's bits independent of the rows beside it and of the thread count, and rank-0 slices zero."""

from __future__ import annotations

import pytest
import torch

from loopserve_kernels import FusedLoRA, cpu_kernel_available, use_backend
from model.fused_projection import TransposedDelta

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="needs the C++ kernels")


def _lora(in_f: int, outs: tuple[int, ...], ranks: tuple[int, ...], seed: int) -> FusedLoRA:
    """Two depths of fused factors: A [2, Σr, in], block-diagonal B [2, Σout, Σr]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, sum(ranks), in_f, generator=g) / in_f**0.5
    b = torch.zeros(2, sum(outs), sum(ranks))
    row = col = 0
    for out, r in zip(outs, ranks, strict=True):
        b[:, row : row + out, col : col + r] = torch.randn(2, out, r, generator=g)
        row, col = row + out, col + r
    return FusedLoRA(a, b, outs, ranks)


@pytest.mark.parametrize(
    ("in_f", "outs", "ranks"),
    [
        (576, (576, 192, 192), (64, 64, 64)),  # SmolLM2's q|k|v at rank 64
        (64, (64, 32, 32), (4, 4, 4)),  # column tails (not multiples of 16)
        (96, (48, 40), (0, 7)),  # a rank-0 slice and odd sizes
    ],
)
def test_low_rank_delta_equals_float64_and_is_row_invariant(
    in_f: int, outs: tuple[int, ...], ranks: tuple[int, ...]
) -> None:
    f = _lora(in_f, outs, ranks, seed=in_f)
    delta = TransposedDelta.build(f, 1)
    x = torch.randn(37, in_f, generator=torch.Generator().manual_seed(1))
    ref = (x.double() @ f.lora_a[1].double().T) @ f.lora_b[1].double().T
    got = delta(x)
    assert got.dtype == torch.float32 and got.shape == (37, sum(outs))
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    if ranks[0] == 0:
        assert torch.equal(got[:, : outs[0]], torch.zeros(37, outs[0]))
    alone = torch.cat([delta(x[i : i + 1]) for i in range(37)])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for start, stop in ((0, 37), (3, 10), (7, 8), (5, 36)):
                assert torch.equal(delta(x[start:stop]), alone[start:stop])
    finally:
        torch.set_num_threads(threads)
    with use_backend("torch"):  # the twin without the kernels: the same values
        torch.testing.assert_close(delta(x).double(), ref, atol=1e-4, rtol=1e-4)
