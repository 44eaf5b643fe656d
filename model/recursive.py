"""The Relaxed Recursive Transformer: one implementation for vanilla and looped models.

Unrolled position p = k + b·K (loop b, block layer k) uses shared weight ``W[k]`` plus the
low-rank delta ``B[k, b] @ A[k, b]``; norms (and q/k/v biases) are kept per position. A vanilla
model is loops = 1, K = L, every rank 0. Per-position tensors are stored layer-major
(``[K, B, ...]``) so the slice a block layer needs (all depths) is contiguous for the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from kernels import dense_per_depth_linear, lora_linear
from kernels.pointwise import add_rms_norm, apply_rope, rms_norm, silu_mul, silu_mul_ref
from model.attention import AttentionBackend, CausalAttention
from model.config import LINEAR_MODULES, ModelConfig
from model.rope import rope_cos_sin, rope_inv_freq

BIAS_MODULES: tuple[str, ...] = ("q", "k", "v")
QKV: tuple[str, ...] = ("q", "k", "v")
KV: tuple[str, ...] = ("k", "v")
GATE_UP: tuple[str, ...] = ("gate", "up")


class Projection(Protocol):
    """Several linear maps of one input as one call (``model.serving`` builds them)."""

    sizes: tuple[int, ...]

    @property
    def per_depth(self) -> bool:
        """Whether each depth has its own weight (else one shared weight plus deltas)."""
        ...

    def __call__(self, layer: int, x: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor: ...


class RecursiveLM(nn.Module):
    """Decoder-only LM whose layer stack is a K-layer block looped ``config.loops`` times."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        a, k_, b_ = config.arch, config.block_layers, config.loops
        kw = {"dtype": dtype, "device": device}
        self.embed = nn.Parameter(torch.zeros(a.vocab_size, a.hidden_size, **kw))
        self.lm_head = (
            None
            if a.tie_word_embeddings
            else nn.Parameter(torch.zeros(a.vocab_size, a.hidden_size, **kw))
        )
        self.final_norm = nn.Parameter(torch.ones(a.hidden_size, **kw))
        self.input_norm = nn.Parameter(torch.ones(k_, b_, a.hidden_size, **kw))
        self.post_attn_norm = nn.Parameter(torch.ones(k_, b_, a.hidden_size, **kw))
        self.weights = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(k_, *a.linear_shape(m), **kw)) for m in LINEAR_MODULES}
        )
        self.biases = nn.ParameterDict(
            {
                m: nn.Parameter(torch.zeros(k_, b_, a.linear_shape(m)[0], **kw))
                for m in (BIAS_MODULES if a.attention_bias else ())
            }
        )
        ranks = config.recursion.ranks
        self.lora_a = nn.ParameterDict(
            {
                m: nn.Parameter(torch.zeros(k_, b_, r, a.linear_shape(m)[1], **kw))
                for m, r in ranks.items()
                if r > 0
            }
        )
        self.lora_b = nn.ParameterDict(
            {
                m: nn.Parameter(torch.zeros(k_, b_, a.linear_shape(m)[0], r, **kw))
                for m, r in ranks.items()
                if r > 0
            }
        )
        # float32 on the CPU on purpose: not a buffer, so .to(bfloat16) cannot round it;
        # rope_cos_sin moves the 64 values to the positions' device.
        self.inv_freq = rope_inv_freq(a)
        # Serving transforms (model.serving), not part of the checkpoint: module -> per-position
        # dense weights [K, B, out, in] for high-rank deltas; module group (or one module) ->
        # a projection that replaced their weights (fused and/or packed).
        self.dense: dict[str, torch.Tensor] = {}
        self.fused: dict[tuple[str, ...], Projection] = {}
        self.packed_head: Callable[[torch.Tensor], torch.Tensor] | None = None
        # what the checkpoint holds, before a serving transform frees what it replaced
        self.checkpoint_parameters = self.num_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def _linear(
        self, module: str, layer: int, x: torch.Tensor, depth: torch.Tensor | int
    ) -> torch.Tensor:
        own = self.fused.get((module,))
        if own is not None:
            y = own(layer, x, depth)
        elif module in self.dense:
            y = dense_per_depth_linear(x, self.dense[module][layer], depth)
        else:
            a = self.lora_a[module][layer] if module in self.lora_a else None
            b = self.lora_b[module][layer] if module in self.lora_b else None
            y = lora_linear(x, self.weights[module][layer], a, b, depth)
        if module in self.biases:
            y = y + self.biases[module][layer][depth]
        return y

    def _project(
        self, group: tuple[str, ...], layer: int, x: torch.Tensor, depth: torch.Tensor | int
    ) -> list[torch.Tensor]:
        """The outputs of modules that read the same input: one fused matmul when the serving
        transform built one for ``group``, else one per module."""
        fused = self.fused.get(group)
        if fused is None:
            return [self._linear(m, layer, x, depth) for m in group]
        outs = fused(layer, x, depth).split(fused.sizes, dim=-1)
        return [
            y + self.biases[m][layer][depth] if m in self.biases else y
            for m, y in zip(group, outs, strict=True)
        ]

    @property
    def has_dense_weights(self) -> bool:
        """Whether some module runs as per-depth dense weights (each depth: its own weight)."""
        return bool(self.dense) or any(f.per_depth for f in self.fused.values())

    def _kv(
        self,
        layer: int,
        h: torch.Tensor,
        depth: torch.Tensor | int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.config.arch
        k, v = self._project(KV, layer, h, depth)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        return apply_rope(k, cos, sin), v.view(-1, a.num_kv_heads, a.head_dim)

    def kv_projection(
        self, layer: int, hidden: torch.Tensor, depth: torch.Tensor | int, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V that block layer ``layer`` at ``depth`` would write if its input were ``hidden``.

        This is CALM-style state propagation: an exited token's hidden state stands in for
        the inputs of the loops it skipped, so later tokens have K/V to attend to there.
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions, hidden.dtype)
        h = rms_norm(hidden, self.input_norm[layer][depth], self.config.arch.rms_norm_eps)
        return self._kv(layer, h, depth, cos, sin)

    def layer_forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        depth: torch.Tensor | int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        """One block layer for rows [T, H], each at its own loop depth."""
        a = self.config.arch
        h = rms_norm(hidden, self.input_norm[layer][depth], a.rms_norm_eps)
        q, k, v = self._project(QKV, layer, h, depth)
        q = apply_rope(q.view(-1, a.num_heads, a.head_dim), cos, sin)
        k = apply_rope(k.view(-1, a.num_kv_heads, a.head_dim), cos, sin)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        attn = self._linear("o", layer, attention(layer, q, k, v), depth)
        hidden, h = add_rms_norm(hidden, attn, self.post_attn_norm[layer][depth], a.rms_norm_eps)
        return hidden + self._linear("down", layer, self._mlp_act(layer, h, depth), depth)

    def _mlp_act(self, layer: int, h: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor:
        """silu(gate) · up; from the fused gate|up output in one pass when there is one."""
        fused = self.fused.get(GATE_UP)
        if fused is not None and not any(m in self.biases for m in GATE_UP):
            return silu_mul(fused(layer, h, depth), self.config.arch.intermediate_size)
        gate, up = self._project(GATE_UP, layer, h, depth)
        return silu_mul_ref(gate, up)

    def block_forward(
        self,
        hidden: torch.Tensor,
        depth: torch.Tensor | int,
        positions: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        """One pass of the K-layer block: the engine's step.

        hidden: [T, H]; depth: [T] loop depth per row (or one int); positions: [T].
        Rows at different depths share the block weights and differ only in their deltas,
        norms and the KV the attention backend reads for their depth.
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions, hidden.dtype)
        for layer in range(self.config.block_layers):
            hidden = self.layer_forward(layer, hidden, depth, cos, sin, attention)
        return hidden

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[input_ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: the exit head, applicable after any loop."""
        h = rms_norm(hidden, self.final_norm, self.config.arch.rms_norm_eps)
        if self.packed_head is not None:
            return self.packed_head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
        head = self.embed if self.lm_head is None else self.lm_head
        return h @ head.T

    def loop_hidden_states(
        self, input_ids: torch.Tensor, num_loops: int | None = None
    ) -> list[torch.Tensor]:
        """Full-sequence forward without cache; the hidden state after each loop.

        input_ids: [N, S] -> list of ``num_loops`` tensors [N, S, H].
        """
        n_loops = self.config.loops if num_loops is None else num_loops
        if not 1 <= n_loops <= self.config.loops:
            raise ValueError(f"num_loops must be in [1, {self.config.loops}], got {n_loops}")
        n, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).repeat(n)
        attention = CausalAttention([s] * n)
        hidden = self.embed_tokens(input_ids.reshape(-1))
        states = []
        for b in range(n_loops):
            hidden = self.block_forward(hidden, b, positions, attention)
            states.append(hidden.view(n, s, -1))
        return states

    def forward(self, input_ids: torch.Tensor, num_loops: int | None = None) -> torch.Tensor:
        """Logits [N, S, V] after ``num_loops`` loops (all by default)."""
        return self.logits(self.loop_hidden_states(input_ids, num_loops)[-1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
