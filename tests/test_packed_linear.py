"""Packed CPU weights (``loopserve_kernels.packed_linear``). The panel layout's bf16 GEMM (C++
``panel_gemm``): outputs within bf16 rounding of a float64 reference, a row's bits independent
of its batch and of the thread count, and a served model on panels keeping the unpacked model's
logits and greedy tokens. float32 weights in oneDNN's layout and in 16-column panels (C++
``panel_gemm_f32``, AVX2 FMA): within float32 rounding of float64, the same batch independence,
and a served float32 model on panels keeping the unpacked model's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loopserve_kernels.cpu_kernels import (
    amx_takes,
    cpu_kernel_available,
    gemm_rows_cpu,
    packed_linear_cpu,
    panel_f32_built,
    panel_gemm_built,
)
from loopserve_kernels.packed_linear import (
    F32_PANEL,
    GEMM_PIECE,
    PANEL,
    TILE_PANEL,
    PackedWeight,
    from_panels,
    gemm_rows,
    onednn_linear,
    packing_supported,
    to_panels,
)
from model.checkpoint import load_model
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from tests.conftest import tiny_llama_config, write_hf_model

panels_only = pytest.mark.skipif(
    not panel_gemm_built(), reason="the panel GEMM needs a CPU with AVX-512 BF16"
)
fp32_only = pytest.mark.skipif(
    not packing_supported(torch.zeros(1, 1)), reason="float32 packing needs oneDNN"
)

SHAPES = [(128, 64), (960, 576), (576, 1536), (64, 2)]
FP32_LAYOUTS = [
    "onednn",
    pytest.param(
        "panels",
        marks=pytest.mark.skipif(not panel_f32_built(), reason="float32 panels: AVX2 and FMA"),
    ),
]
WIDTHS = [
    PANEL,
    pytest.param(
        TILE_PANEL, marks=pytest.mark.skipif(not amx_takes(32), reason="32-wide panels: AMX")
    ),
]


def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding of the result plus float32 accumulation over K products."""
    k = x.shape[1]
    magnitude = x.double().abs() @ w.double().abs().T
    return ref.abs() * 2.0**-8 + magnitude * (k * 2.0**-24) + 1e-30


@panels_only
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 16, 17, 31, 32, 33, 70])
def test_panel_gemm_is_within_bf16_rounding_of_float64(
    shape: tuple[int, int], rows: int, width: int
) -> None:
    if width == TILE_PANEL and shape[1] % 32:
        pytest.skip("32-wide panels take in-features divisible by 32")
    torch.manual_seed(rows)
    w = torch.randn(shape, dtype=torch.bfloat16)
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    packed = PackedWeight.pack(w, "panels", width)
    assert packed.packed.shape[2] == width
    y = packed(x)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.bfloat16
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).abs() <= _bound(x, w, ref)).all()


@panels_only
@pytest.mark.parametrize("width", WIDTHS)
def test_panel_gemm_row_is_the_same_in_any_batch_and_thread_count(width: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(960, 576, dtype=torch.bfloat16)
    x = torch.randn(70, 576, dtype=torch.bfloat16)
    assert_rows_invariant(PackedWeight.pack(w, "panels", width), x)


def assert_rows_invariant(packed: PackedWeight, x: torch.Tensor) -> None:
    """Each of the 70 rows of ``x`` gets the same bits in any slice of them, on 1 or 2 threads."""
    alone = torch.cat([packed(x[i : i + 1]) for i in range(70)])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for start, stop in ((0, 70), (3, 10), (7, 8), (11, 38), (1, 34), (5, 69)):
                assert torch.equal(packed(x[start:stop]), alone[start:stop])
    finally:
        torch.set_num_threads(threads)


@panels_only
@pytest.mark.parametrize("width", WIDTHS)
def test_panel_gemm_reads_strided_rows(width: int) -> None:
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)[:, ::2]
    packed = PackedWeight.pack(w, "panels", width)
    assert torch.equal(packed(x), packed(x.contiguous()))


@panels_only
def test_panels_round_trip_and_refuse_other_shapes() -> None:
    w = torch.randn(192, 96, dtype=torch.bfloat16)
    for width in (PANEL, TILE_PANEL):
        assert torch.equal(from_panels(to_panels(w, width)), w)
    assert PackedWeight.pack(w, "panels")(torch.zeros(0, 96, dtype=torch.bfloat16)).shape == (
        0,
        192,
    )
    for bad in ((100, 64), (64, 7)):
        with pytest.raises(ValueError, match="no panel layout"):
            PackedWeight.pack(torch.zeros(bad, dtype=torch.bfloat16), "panels", PANEL)
    if amx_takes(32):
        with pytest.raises(ValueError, match="divisible by 32"):
            PackedWeight.pack(torch.zeros(64, 48, dtype=torch.bfloat16), "panels", TILE_PANEL)
    with pytest.raises(ValueError, match=r"must be torch\.bfloat16"):
        PackedWeight.pack(w, "panels")(torch.zeros(2, 96))


@pytest.fixture(scope="module")
def panel_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every projection and the LM head of a width the panels take (multiples of 64)."""
    d = tmp_path_factory.mktemp("llama_panels")
    config = tiny_llama_config(
        vocab_size=128, hidden_size=64, num_attention_heads=4, intermediate_size=128
    )
    write_hf_model(d, config)
    return d


@panels_only
@torch.no_grad()
def test_served_model_on_panels_keeps_logits_and_greedy_tokens(panel_llama: Path) -> None:
    ref = load_model(panel_llama).to(torch.bfloat16)
    model = load_model(panel_llama).to(torch.bfloat16)
    plan = prepare_for_serving(model)
    assert ("lm_head",) in plan.packed
    layouts = {w.layout for p in model.fused.values() for ws in p.weights for w in ws}
    assert layouts == {"panels"} and model.packed_head.layout == "panels"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    got, want = model(ids).double(), ref(ids).double()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    cfg = EngineConfig(block_size=4, num_blocks=256, max_model_len=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": ids[i % 2, : 5 + 3 * i].tolist() for i in range(4)}
    assert Engine(model, cfg).generate(prompts, params) == Engine(ref, cfg).generate(
        prompts, params
    )


@fp32_only
@pytest.mark.parametrize("layout", FP32_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 12, 13, 17, 32, 33, 70])
def test_fp32_packed_weight_is_within_float32_rounding_of_float64(
    shape: tuple[int, int], rows: int, layout: str
) -> None:
    torch.manual_seed(rows)
    w, x = torch.randn(shape), torch.randn(rows, shape[1])
    packed = PackedWeight.pack(w, layout)
    assert packed.layout == layout and packed.dtype == torch.float32
    if layout == "panels":
        assert packed.packed.shape == (shape[0] // F32_PANEL, shape[1], F32_PANEL)
    y = packed(x)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    ref = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T
    assert ((y.double() - ref).abs() <= magnitude * (shape[1] * 2.0**-24) + 1e-30).all()


@fp32_only
@pytest.mark.parametrize("layout", FP32_LAYOUTS)
def test_fp32_packed_row_is_the_same_in_any_batch_and_thread_count(layout: str) -> None:
    """What ``F.linear`` (MKL) does not give: it switches kernels below a few rows."""
    torch.manual_seed(0)
    for shape in ((960, 576), (576, 1536)):
        packed = PackedWeight.pack(torch.randn(shape), layout)
        assert_rows_invariant(packed, torch.randn(70, shape[1]))


@fp32_only
def test_fp32_panels_are_the_default_where_built_and_read_strided_rows() -> None:
    w = torch.randn(128, 64)
    packed = PackedWeight.pack(w)
    assert packed.layout == ("panels" if panel_f32_built() else "onednn")
    assert packed.dtype == torch.float32
    assert PackedWeight.pack(torch.randn(100, 64)).layout == "onednn"  # 100 % 16: no panels
    if panel_f32_built():
        assert torch.equal(from_panels(packed.packed), w)
        x = torch.randn(5, 128)[:, ::2]
        assert torch.equal(packed(x), packed(x.contiguous()))


@fp32_only
def test_fp32_weights_refuse_wrong_panels_and_other_dtypes() -> None:
    w = torch.randn(128, 64)
    with pytest.raises(ValueError, match="float32 panels are 16 columns wide"):
        PackedWeight.pack(w, "panels", PANEL)
    if panel_f32_built():
        with pytest.raises(ValueError, match="no panel layout"):
            PackedWeight.pack(torch.randn(100, 64), "panels")
    with pytest.raises(ValueError, match=r"must be torch\.float32"):
        PackedWeight.pack(w)(torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="cannot pack"):
        PackedWeight.pack(w.double())


@pytest.mark.skipif(not panel_f32_built(), reason="float32 panels: AVX2 and FMA")
@torch.no_grad()
def test_served_float32_model_on_panels_keeps_logits_and_greedy_tokens(panel_llama: Path) -> None:
    ref = load_model(panel_llama)
    model = load_model(panel_llama)
    prepare_for_serving(model)
    layouts = {w.layout for p in model.fused.values() for ws in p.weights for w in ws}
    assert layouts == {"panels"} and model.packed_head.layout == "panels"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    got, want = model(ids).double(), ref(ids).double()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    cfg = EngineConfig(block_size=4, num_blocks=256, max_model_len=64)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": ids[i % 2, : 5 + 3 * i].tolist() for i in range(4)}
    assert Engine(model, cfg).generate(prompts, params) == Engine(ref, cfg).generate(
        prompts, params
    )


def test_gemm_rows_pads_to_few_counts_and_little() -> None:
    """oneDNN keeps a compiled primitive per row count it meets: the padded counts must be few
    (a bounded cache) and each at most a quarter above the rows asked for; one row is padded to
    two, whose kernel is every other count's."""
    counts = [gemm_rows(m) for m in range(GEMM_PIECE + 1)]
    assert counts[:17] == [0, 2, *range(2, 17)]
    assert all(m <= c <= max(m, 16) + m // 4 for m, c in enumerate(counts))
    assert all(gemm_rows(c) == c for c in counts)  # a padded count is its own bucket
    assert len(set(counts)) <= 17 + 4 * 5
    with pytest.raises(ValueError, match="gemm_rows takes"):
        gemm_rows(GEMM_PIECE + 1)


@pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ kernels did not build")
def test_cpp_layer_pads_rows_by_the_same_rule() -> None:
    assert [gemm_rows_cpu(m) for m in range(GEMM_PIECE + 1)] == [
        gemm_rows(m) for m in range(GEMM_PIECE + 1)
    ]


@fp32_only
@pytest.mark.parametrize("rows", [1, 17, 45, 511, 512, 513, 1100])
def test_padded_and_pieced_gemm_equals_each_row_alone(rows: int) -> None:
    """Padding to a bucket and cutting into ``GEMM_PIECE`` pieces change no row's bits, in the
    C++ call the decode layer makes and in the Python one used without the C++ kernels."""
    torch.manual_seed(rows)
    w, x = torch.randn(96, 64), torch.randn(rows, 64)
    packed = PackedWeight.pack(w, "onednn")
    alone = torch.cat([onednn_linear(x[i : i + 1], packed.packed) for i in range(rows)])
    assert torch.equal(onednn_linear(x, packed.packed), alone)
    if cpu_kernel_available():
        assert torch.equal(packed_linear_cpu(x, packed.packed), alone)
    ref = x.double() @ w.double().T
    assert (
        (alone.double() - ref).abs() <= (x.double().abs() @ w.double().abs().T) * 2.0**-18
    ).all()
