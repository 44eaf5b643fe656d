"""The block layer's pointwise chains: the C++ kernels against their torch twins and a float64
reference, in every dtype, on the strided views the model hands them; autograd falls back to
the twins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopserve_kernels import use_backend
from loopserve_kernels.pointwise import (
    add_rms_norm,
    apply_rope,
    apply_rope_ref,
    rms_norm,
    rms_norm_ref,
    silu_mul,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.double(), rtol=TOL[dtype], atol=TOL[dtype])


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_rms_norm(dtype: torch.dtype, per_row: bool) -> None:
    wide = _rand(7, 2 * 40, seed=1)
    x = wide[:, :40].to(dtype)  # strided rows, as a slice of a wider output
    w = (_rand(7, 40, seed=2) if per_row else _rand(40, seed=2)).to(dtype)
    golden = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    with use_backend("cpp"):
        got = rms_norm(x, w, 1e-5)
    _close(got, golden, dtype)
    _close(got, rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype: torch.dtype) -> None:
    x, r, w = (_rand(*s, seed=i).to(dtype) for i, s in enumerate([(5, 48), (5, 48), (48,)]))
    with use_backend("cpp"):
        total, normed = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, x + r)  # rounded as torch's add rounds
    _close(normed, rms_norm_ref(x + r, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_a_fused_projection_view(dtype: torch.dtype) -> None:
    qkv = _rand(6, 4 * 16 + 2 * 2 * 16, seed=3).to(dtype)
    pos = torch.arange(6, dtype=torch.float64)[:, None] * 10 ** (-torch.arange(8) / 8)[None]
    emb = torch.cat((pos, pos), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = qkv[:, :64].view(6, 4, 16)
    want = apply_rope_ref(q.clone(), cos, sin)
    x = q.double()
    golden = (
        x * cos.double()[:, None] + torch.cat((-x[..., 8:], x[..., :8]), -1) * sin.double()[:, None]
    )
    untouched = qkv[:, 64:].clone()
    with use_backend("cpp"):
        got = apply_rope(q, cos, sin)
    assert got.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(qkv[:, 64:], untouched)
    _close(got, want, dtype)
    _close(got, golden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    gate_up = (_rand(5, 2 * 70, seed=4) * 4).to(dtype)
    gate, up = gate_up.double().split(70, -1)
    with use_backend("cpp"):
        got = silu_mul(gate_up, 70)
    _close(got, F.silu(gate) * up, dtype)


def test_autograd_takes_the_twins() -> None:
    x = _rand(3, 16, seed=5).float().requires_grad_()
    w = torch.ones(16, requires_grad=True)
    rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad(), use_backend("torch"):
        assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
