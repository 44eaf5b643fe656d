"""The one-call C++ decode layer (``model.fused_layer``) gives the Python layer's hidden states
bit for bit, and the engine's tokens and logprobs with it equal those without it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from loopserve_kernels import DecodeInputs, cpu_kernel_available, packing_supported
from model.checkpoint import load_model
from model.config import FULL_RANK, LINEAR_MODULES
from model.convert import convert
from model.fused_layer import DecodeLayer
from model.recursive import RecursiveLM
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from tests.conftest import tiny_llama_config, write_hf_model

pytestmark = pytest.mark.skipif(
    not cpu_kernel_available(), reason="the fused layer runs the C++ kernels"
)
DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            not packing_supported(torch.zeros(1, 1, dtype=dtype)),
            reason=f"{dtype} weights cannot be packed on this CPU",
        ),
        id=str(dtype).removeprefix("torch."),
    )
    for dtype in (torch.bfloat16, torch.float32)
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llama_d16")  # head_dim 16: the decode kernel's lanes
    write_hf_model(
        d, tiny_llama_config(hidden_size=64, num_attention_heads=4, intermediate_size=96)
    )
    return d


def _variant(directory: Path, name: str) -> RecursiveLM:
    model = load_model(directory)
    ranks = {"vanilla": None, "exact-b2": FULL_RANK, "rank4-b2": 4}[name]
    if ranks is not None:
        model = convert(model, 2, "average", dict.fromkeys(LINEAR_MODULES, ranks), progress=False)[
            0
        ]
    return model


def _served(model: RecursiveLM, dtype: torch.dtype = torch.bfloat16) -> RecursiveLM:
    model = model.to(dtype)
    prepare_for_serving(model)
    return model


class _Counted:
    """The model's fused layer, counting its calls (a test that never ran it cannot pass)."""

    def __init__(self, inner: DecodeLayer) -> None:
        self.inner, self.calls, self.with_chunks, self.mixed, self.fills = inner, 0, 0, 0, 0

    def applies(self, hidden: torch.Tensor) -> bool:
        return self.inner.applies(hidden)

    def segments(self, depth: torch.Tensor | int, rows: int) -> list[tuple[int, int, int]] | None:
        return self.inner.segments(depth, rows)

    def fill_segments(self, depth: torch.Tensor) -> list[tuple[int, int, int]] | None:
        return self.inner.fill_segments(depth)

    def fill(self, *args: Any) -> None:
        self.fills += len(args[4])  # layers filled: one C++ call takes every layer's caches
        self.inner.fill(*args)

    def __call__(self, *args: object) -> torch.Tensor:
        self.calls += 1
        segments, inputs = args[1], args[-1]
        assert isinstance(segments, list) and isinstance(inputs, DecodeInputs)
        self.with_chunks += inputs.chunks[-1].numel() > 0
        self.mixed += len(segments) > 1
        return self.inner(*args)


def _generate(model: RecursiveLM, batching: str, forced: tuple[float, ...] = ()) -> list[tuple]:
    """Every step's outputs: request, tokens, sampled logprobs and top-2, exit depths;
    ``forced``: per-depth exit weights (tokens leave at every depth, their K/V filled)."""
    cfg = EngineConfig(
        block_size=4,
        num_blocks=512,
        max_model_len=96,
        batching=batching,
        max_num_seqs=8,
        forced_exit_weights=forced,
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    g = torch.Generator().manual_seed(7)
    engine = Engine(model, cfg)
    for i in range(6):  # prompts of 3 .. 28 tokens: prefill chunks beside decode rows
        engine.add_request(
            f"r{i}", torch.randint(0, 101, (3 + 5 * i,), generator=g).tolist(), params
        )
    steps = []
    while engine.has_work:
        steps.append(
            [(o.request_id, o.token_ids, o.samples, o.exit_depths) for o in engine.step()[0]]
        )
    return steps


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("name", "batching", "forced"),
    [
        ("vanilla", "sequence", ()),
        ("vanilla", "depth", ()),
        ("exact-b2", "depth", ()),
        ("exact-b2", "sequence", ()),
        ("exact-b2", "depth", (1.0, 1.0)),
        ("rank4-b2", "depth", ()),
        ("rank4-b2", "depth", (1.0, 1.0)),
        ("rank4-b2", "sequence", (1.0, 1.0)),
    ],
)
def test_engine_with_the_fused_layer_equals_the_python_layer(
    llama_dir: Path, name: str, batching: str, forced: tuple[float, ...], dtype: torch.dtype
) -> None:
    """Same tokens, logprobs and exit depths, step by step; the exact B = 2 conversion serves
    dense per-depth weights (aligned depth-wise batching: one depth a step, as the fused layer
    needs them), the rank-4 one a shared weight plus packed deltas at mixed depths (each depth's
    rows a slice with its own norms and deltas), each also with forced exits at both depths
    (exited tokens' K/V filled at the depth they skipped, through each depth's weights). The fused
    layer must have run for most layers, prefill chunks among them, and under forced exits
    in depth-wise batching steps at two depths."""
    fused, python = (_served(_variant(llama_dir, name), dtype) for _ in range(2))
    python.decode_layer = None
    assert isinstance(fused.decode_layer, DecodeLayer)
    counted = _Counted(fused.decode_layer)
    fused.decode_layer = counted
    assert _generate(fused, batching, forced) == _generate(python, batching, forced)
    assert counted.calls >= 11 * fused.config.block_layers  # every all-decode step
    assert counted.with_chunks >= fused.config.block_layers  # steps with prompt chunks too
    if forced and batching == "depth":
        assert counted.fills >= 4 * fused.config.block_layers  # exited tokens' K/V, in C++
        if name == "rank4-b2":  # mixed depths (the exact model's steps are aligned)
            assert counted.mixed >= 4 * fused.config.block_layers


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_the_fused_layer_cannot_compute_keep_the_python_layer(
    llama_dir: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    """Dense per-depth weights at mixed depths (no segments: the Python layer runs), biases
    (Qwen2), float64 weights (nothing packed): no fused layer runs them, so nothing is
    computed wrongly in C++."""
    exact = _served(_variant(llama_dir, "exact-b2"), dtype).decode_layer
    assert isinstance(exact, DecodeLayer)
    assert exact.segments(torch.tensor([0, 0, 1]), 3) is None
    assert exact.segments(1, 3) == [(1, 0, 3)]
    compact = _served(_variant(llama_dir, "rank4-b2"), dtype).decode_layer
    assert isinstance(compact, DecodeLayer)
    assert compact.segments(torch.tensor([0, 0, 1]), 3) == [(0, 0, 2), (1, 2, 3)]
    assert compact.segments(torch.tensor([1, 0]), 2) is None  # unsorted rows
    assert _served(_variant(llama_dir, "vanilla"), dtype).decode_layer is not None
    unpacked = load_model(llama_dir).to(torch.float64)
    prepare_for_serving(unpacked)
    assert unpacked.decode_layer is None
    cfg = Qwen2Config(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    assert _served(load_model(tmp_path), dtype).decode_layer is None


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [FULL_RANK, 4], ids=["exact-b3", "rank4-b3"])
def test_fills_in_cpp_write_the_python_layers_kv_at_every_depth(
    llama_dir: Path, rank: int, dtype: torch.dtype
) -> None:
    """K/V fills at two deeper depths at once (B = 3: per-depth dense weights, two GEMMs, or a
    shared weight with each depth's deltas), the C++ call cutting its weights to their k|v
    columns: every cache row the Python layer's bit for bit, and within the dtype's rounding of
    a float64 copy of the unserved model; rows outside the fill's slots untouched."""
    source = convert(
        load_model(llama_dir), 3, "average", dict.fromkeys(LINEAR_MODULES, rank), progress=False
    )[0]
    reference = copy.deepcopy(source).to(torch.float64)
    fused, python = (_served(copy.deepcopy(source), dtype) for _ in range(2))
    python.decode_layer = None
    assert isinstance(fused.decode_layer, DecodeLayer)
    a = fused.config.arch
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, a.hidden_size, generator=g)
    depth = torch.tensor([1, 1, 1, 2, 2, 2, 2])
    positions = torch.tensor([5, 9, 2, 5, 9, 2, 30])
    slots = torch.tensor([3, 17, 40, 4, 18, 41, 63])
    caches = []
    for model in (fused, python, reference):
        shape = (16, 4, a.num_kv_heads, a.head_dim)
        dt = model.embed.dtype
        k = [torch.full(shape, 7.0, dtype=dt) for _ in range(model.config.block_layers)]
        v = [t.clone() for t in k]
        model.fill_kv(hidden.to(dt), depth, positions, slots, k, v)
        caches.append((k, v))
    (fk, fv), (pk, pv), (rk, rv) = caches
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for layer in range(fused.config.block_layers):
        for f, p, r in ((fk[layer], pk[layer], rk[layer]), (fv[layer], pv[layer], rv[layer])):
            assert torch.equal(f, p)
            flat = f.view(64, -1)
            assert bool((flat[untouched] == 7.0).all())
            ref = r.view(64, -1)[slots].to(torch.float32)
            err = (flat[slots].float() - ref).abs().max()
            assert err <= tol * max(1.0, float(ref.abs().max()))
