"""A whole block layer in one C++ call for steps on the CPU path.

The Python layer (``RecursiveLM.layer_forward``) runs a Llama layer as about a dozen kernel
calls, each behind a few Python frames: ~0.3 ms of interpreter time a layer, 9 ms of a 41 ms
step for SmolLM2's 30 layers at 16 decode rows on two threads. When the rows of a step share
a depth (sequence-wise batching, aligned depth-wise batching over dense per-depth weights),
``kernels.cpu_kernels.decode_layer`` runs the same kernels in the same order from C++ — decode
rows and prefill chunks alike — so the step's hidden states are the Python layer's, bit for
bit. Everything else (mixed depths, low-rank deltas, sliding windows, the families with other
norms or activations) keeps the Python layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import DecodeInputs, cpu_kernel_available, cpu_kernel_mode, decode_layer_cpu
from model.packed_projection import PackedProjection
from model.recursive import GATE_UP, QKV, RecursiveLM

LAYER_GROUPS: tuple[tuple[str, ...], ...] = (QKV, ("o",), GATE_UP, ("down",))


def fits(model: RecursiveLM) -> bool:
    """Whether the model's layers are the ones the C++ layer computes: RMSNorm, full RoPE,
    silu-gated MLP, no biases, QK-norm, sandwich norms, windows or parallel residual, the
    default attention scale, and every projection packed (float32, or bf16 on a CPU with
    native bf16)."""
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
        and all(isinstance(model.fused.get(g), PackedProjection) for g in LAYER_GROUPS)
        and all(not model.fused[g].skip for g in LAYER_GROUPS)
    )


@dataclass(frozen=True)
class LayerWeights:
    """One (layer, depth)'s norms and packed q|k|v, o, gate|up and down weights."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    packed: list[torch.Tensor]


@dataclass(frozen=True)
class DecodeLayer:
    """The packed weights and norms ``decode_layer`` reads, per (layer, depth), looked up
    once at load rather than in every layer of every step."""

    weights: list[list[LayerWeights]]  # [layer][depth]
    eps: float
    heads_q: int

    @staticmethod
    def build(model: RecursiveLM) -> DecodeLayer:
        """For a model ``fits`` accepts."""
        groups = [model.fused[g] for g in LAYER_GROUPS]
        assert all(isinstance(p, PackedProjection) for p in groups)
        weights = [
            [
                LayerWeights(
                    model.input_norm[k][d],
                    model.post_attn_norm[k][d],
                    [p.weights[k][d if p.per_depth else 0].packed for p in groups],
                )
                for d in range(model.config.loops)
            ]
            for k in range(model.config.block_layers)
        ]
        a = model.config.arch
        return DecodeLayer(weights, a.rms_norm_eps, a.num_heads)

    def applies(self, hidden: torch.Tensor) -> bool:
        """The C++ kernels run this call: CPU bf16 or float32 rows, no autograd, kernels
        built."""
        if hidden.dtype not in (torch.bfloat16, torch.float32) or torch.is_grad_enabled():
            return False
        mode = cpu_kernel_mode(hidden)
        return mode == "require" or (mode == "prefer" and cpu_kernel_available())

    def __call__(
        self,
        layer: int,
        depth: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inputs: DecodeInputs,
    ) -> torch.Tensor:
        w = self.weights[layer][depth]
        return decode_layer_cpu(
            hidden.contiguous(),
            w.input_norm,
            w.post_attn_norm,
            self.eps,
            w.packed,
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
