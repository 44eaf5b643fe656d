"""A whole block layer in one C++ call for steps on the CPU path.

The Python layer (``RecursiveLM.layer_forward``) runs a Llama layer as about a dozen kernel
calls, each behind a few Python frames: ~0.3 ms of interpreter time a layer, 9 ms of a 41 ms
step for SmolLM2's 30 layers at 16 decode rows on two threads; a compact model's step at three
depths adds a shrink and one expand per slice per depth to every projection. When the step's
rows share their base weights — one depth (sequence-wise batching, aligned depth-wise batching
over dense per-depth weights), or any depths of a shared block with low-rank deltas —
``loopserve_kernels.cpu_kernels.decode_layer`` runs the same kernels in the same order from C++,
decode rows and prefill chunks alike, each depth's rows a slice with its norms and deltas, so the
step's hidden states are the Python layer's, bit for bit. Everything else (dense per-depth weights
at mixed depths, sliding windows, the families with other norms or activations) keeps the Python
layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopserve_kernels import (
    DecodeInputs,
    cpu_kernel_available,
    cpu_kernel_mode,
    decode_layer_cpu,
    fill_kv_layers_cpu,
)
from loopserve_kernels.lora_linear import depth_segments
from model.fused_projection import Delta, FusedProjection
from model.packed_projection import PackedProjection
from model.recursive import GATE_UP, QKV, RecursiveLM

LAYER_GROUPS: tuple[tuple[str, ...], ...] = (QKV, ("o",), GATE_UP, ("down",))
Segments = list[tuple[int, int, int]]


def _packed_groups(model: RecursiveLM) -> bool:
    """Every layer group's base weight packed: dense (per depth or shared), or a shared weight
    with packed low-rank deltas, the same kind for all four."""
    groups = [model.fused.get(g) for g in LAYER_GROUPS]
    if all(isinstance(p, PackedProjection) and not p.skip for p in groups):
        return True
    return all(
        isinstance(p, FusedProjection)
        and p.packed is not None
        and p.packed_lora is not None
        and not p.skip
        for p in groups
    )


def fits(model: RecursiveLM) -> bool:
    """Whether the model's layers are the ones the C++ layer computes: RMSNorm, full RoPE,
    silu-gated MLP, no biases, QK-norm, sandwich norms, windows or parallel residual, the
    default attention scale, and every projection packed (float32, or bf16 on a CPU with
    native bf16), its deltas too where it has them."""
    a = model.config.arch
    return (
        a.norm == "rms"
        and a.gated_mlp
        and a.hidden_act == "silu"
        and not (a.parallel_residual or a.sandwich_norm or a.qk_norm)
        and not model.biases
        and model.windows is None
        and a.attn_scale == a.head_dim**-0.5
        and a.rotary_dim in (0, a.head_dim)
        and _packed_groups(model)
    )


def _delta_lists(delta: Delta) -> tuple[list[torch.Tensor | None], list[int]]:
    """One group's delta as ``decode_layer`` reads it: the shrink then each slice's expand
    (None where its rank is 0); the slice count then (out, rank) per slice."""
    weights = delta.factors()
    dims = [len(delta.ranks)]
    for out, r in zip(delta.out_sizes, delta.ranks, strict=True):
        dims += [out, r]
    return weights, dims


@dataclass(frozen=True)
class LayerWeights:
    """One (layer, depth)'s norms, packed q|k|v, o, gate|up and down weights, and the four
    groups' low-rank deltas as flat lists (empty without deltas)."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    packed: list[torch.Tensor]
    delta_weights: list[torch.Tensor | None]
    delta_dims: list[int]
    qkv_delta_weights: list[torch.Tensor | None]  # the q|k|v group's alone, for K/V fills
    qkv_delta_dims: list[int]


@dataclass(frozen=True)
class DecodeLayer:
    """The packed weights, norms and deltas ``decode_layer`` reads, per (layer, depth), looked
    up once at load rather than in every layer of every step."""

    weights: list[list[LayerWeights]]  # [layer][depth]
    eps: float
    heads_q: int
    shared: bool  # one base weight for every depth: steps at mixed depths run here too

    @staticmethod
    def build(model: RecursiveLM) -> DecodeLayer:
        """For a model ``fits`` accepts."""
        groups = [model.fused[g] for g in LAYER_GROUPS]
        loops = model.config.loops

        def base(p: PackedProjection | FusedProjection, k: int, d: int) -> torch.Tensor:
            if isinstance(p, PackedProjection):
                return p.weights[k][d if p.per_depth else 0].packed
            assert p.packed is not None
            return p.packed[k].packed

        def deltas(k: int, d: int, of: list) -> tuple[list[torch.Tensor | None], list[int]]:
            weights: list[torch.Tensor | None] = []
            dims: list[int] = []
            for p in of:
                if isinstance(p, FusedProjection) and p.packed_lora is not None:
                    w, n = _delta_lists(p.packed_lora[k][d])
                    weights += w
                    dims += n
            return weights, dims

        weights = [
            [
                LayerWeights(
                    model.input_norm[k][d],
                    model.post_attn_norm[k][d],
                    [base(p, k, d) for p in groups],
                    *deltas(k, d, groups),
                    *deltas(k, d, groups[:1]),
                )
                for d in range(loops)
            ]
            for k in range(model.config.block_layers)
        ]
        shared = not any(isinstance(p, PackedProjection) and p.per_depth for p in groups)
        a = model.config.arch
        return DecodeLayer(weights, a.rms_norm_eps, a.num_heads, shared)

    def applies(self, hidden: torch.Tensor) -> bool:
        """The C++ kernels run this call: CPU bf16 or float32 rows, no autograd, kernels
        built."""
        if hidden.dtype not in (torch.bfloat16, torch.float32) or torch.is_grad_enabled():
            return False
        mode = cpu_kernel_mode(hidden)
        return mode == "require" or (mode == "prefer" and cpu_kernel_available())

    def segments(self, depth: torch.Tensor | int, rows: int) -> Segments | None:
        """The step's ``(depth, start, stop)`` row slices, once per block pass; None where this
        layer cannot run the step (mixed depths over per-depth base weights, unsorted rows)."""
        if isinstance(depth, int):
            return [(depth, 0, rows)]
        if not self.shared:
            return None
        return depth_segments(depth, len(self.weights[0]))

    def _at(self, layer: int, segments: Segments) -> tuple[list[LayerWeights], list[int]]:
        """Each segment's weights at ``layer``, and the flat (start, stop) pairs C++ reads."""
        ws = [self.weights[layer][d] for d, _, _ in segments]
        return ws, [b for _, lo, hi in segments for b in (lo, hi)]

    def __call__(
        self,
        layer: int,
        segments: Segments,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inputs: DecodeInputs,
    ) -> torch.Tensor:
        ws, bounds = self._at(layer, segments)
        return decode_layer_cpu(
            hidden.contiguous(),
            bounds,
            [n for w in ws for n in (w.input_norm, w.post_attn_norm)],
            [t for w in ws for t in w.delta_weights],
            [n for w in ws for n in w.delta_dims],
            self.eps,
            ws[0].packed,
            cos,
            sin,
            inputs.k_caches[layer],
            inputs.v_caches[layer],
            inputs.slot_mapping,
            inputs.plan,
            inputs.chunks,
            self.heads_q,
            inputs.scale,
        )

    def fill_segments(self, depth: torch.Tensor) -> Segments | None:
        """Fill rows' ``(depth, start, stop)`` slices (rows sorted by depth; any weights: a
        fill runs each depth's own GEMM where depths have their own)."""
        return depth_segments(depth, len(self.weights[0]))

    def fill(
        self,
        segments: Segments,
        hidden: torch.Tensor,
        cos: list[torch.Tensor],
        sin: list[torch.Tensor],
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        slots: torch.Tensor,
    ) -> None:
        """``RecursiveLM.kv_projection`` + ``write_kv`` of every layer for fill rows, in one
        C++ call (``cos``, ``sin``, the caches: one per layer)."""
        bounds = self._at(0, segments)[1]
        layers = [self._at(layer, segments)[0] for layer in range(len(k_caches))]
        fill_kv_layers_cpu(
            hidden.contiguous(),
            bounds,
            [[w.input_norm for w in ws] for ws in layers],
            [[t for w in ws for t in w.qkv_delta_weights] for ws in layers],
            [[n for w in ws for n in w.qkv_delta_dims] for ws in layers],
            self.eps,
            [[w.packed[0] for w in ws] for ws in layers],
            cos,
            sin,
            k_caches,
            v_caches,
            slots,
            self.heads_q,
        )
