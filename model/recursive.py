"""The Relaxed Recursive Transformer: one implementation for vanilla and looped models.

Unrolled position p = k + b·K (loop b, block layer k) uses shared weight ``W[k]`` plus the
low-rank delta ``B[k, b] @ A[k, b]``; norms (and biases) are kept per position. A vanilla
model is loops = 1, K = L, every rank 0. Per-position tensors are stored layer-major
(``[K, B, ...]``) so the slice a block layer needs (all depths) is contiguous for the kernels.
A middle-cycle model keeps its first P and last E original layers unique: two more stacks of
the same layer code (loops = 1, dense weights), run once per token before loop 0 and on the
exit hidden state, and the block's position p is original layer P + p.
Where the families differ (norm, activation, QK-norm, residual, RoPE, sliding window) the
layer calls ``model.families``; the defaults are Llama's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from loopserve_kernels import DecodeInputs, dense_per_depth_linear, lora_linear, write_kv
from loopserve_kernels.pointwise import add_rms_norm, apply_rope, silu_mul
from model.attention import AttentionBackend, CausalAttention
from model.config import ArchConfig, ModelConfig
from model.exit_heads import ExitHeads
from model.families import Rotary, activate, norm, window_table
from model.rope import rope_cos_sin

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


class DecodeLayerFn(Protocol):
    """A whole block layer over a step's decode rows in one call (``model.fused_layer``)."""

    def applies(self, hidden: torch.Tensor) -> bool: ...

    def segments(
        self, depth: torch.Tensor | int, rows: int
    ) -> list[tuple[int, int, int]] | None: ...

    def __call__(
        self,
        layer: int,
        segments: list[tuple[int, int, int]],
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inputs: DecodeInputs,
    ) -> torch.Tensor: ...

    def fill_segments(self, depth: torch.Tensor) -> list[tuple[int, int, int]] | None: ...

    def fill(
        self,
        segments: list[tuple[int, int, int]],
        hidden: torch.Tensor,
        cos: list[torch.Tensor],
        sin: list[torch.Tensor],
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        slots: torch.Tensor,
    ) -> None: ...


class LayerStack(nn.Module):
    """``layers`` decoder layers run ``loops`` times, with per-position norms, biases and
    deltas: a model's shared block, or (loops = 1, no deltas) a middle-cycle model's unique
    first or last layers, which run the same layer code on their own dense weights.

    ``first`` is the original layer of the stack's position 0: it picks each position's
    sliding window and RoPE base (Gemma 3). The serving transforms (``model.serving``: fused
    and packed projections, the one-call C++ decode layer) fill ``dense``, ``fused`` and
    ``decode_layer`` of the block only; a unique stack keeps them empty and runs the Python
    layer path.
    """

    def __init__(
        self,
        arch: ArchConfig,
        layers: int,
        loops: int,
        ranks: dict[str, int],
        first: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.stack_layers = layers
        a, k_, b_ = arch, layers, loops
        kw = {"dtype": dtype, "device": device}
        self.input_norm = nn.Parameter(torch.ones(k_, b_, a.hidden_size, **kw))
        self.post_attn_norm = nn.Parameter(torch.ones(k_, b_, a.hidden_size, **kw))
        # the family's other per-position norms: LayerNorm biases, Gemma's output norms, QK-norm
        self.norms = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(k_, b_, a.norm_size(n), **kw)) for n in a.position_norms}
        )
        self.weights = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(k_, *a.linear_shape(m), **kw)) for m in a.linear_modules}
        )
        self.biases = nn.ParameterDict(
            {
                m: nn.Parameter(torch.zeros(k_, b_, a.linear_shape(m)[0], **kw))
                for m in a.bias_modules
            }
        )
        ranks = {m: ranks[m] for m in a.linear_modules}
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
        self.rotary = Rotary(a, k_, b_, first)
        self.windows = window_table(a, k_, b_, first)
        # Serving transforms (model.serving), not part of the checkpoint: module -> per-position
        # dense weights [K, B, out, in] for high-rank deltas; module group (or one module) ->
        # a projection that replaced their weights (fused and/or packed).
        self.dense: dict[str, torch.Tensor] = {}
        self.fused: dict[tuple[str, ...], Projection] = {}
        # set by model.serving when every layer fits the one-call C++ decode layer
        self.decode_layer: DecodeLayerFn | None = None

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

    def _norm(
        self, x: torch.Tensor, name: str, layer: int, depth: torch.Tensor | int
    ) -> torch.Tensor:
        """Per-position norm ``name`` (input / post_attn, or one of ``self.norms``)."""
        a = self.arch
        if name in ("input", "post_attn"):
            weight = (self.input_norm if name == "input" else self.post_attn_norm)[layer][depth]
            bias = self.norms[f"{name}_bias"][layer][depth] if a.norm == "layer" else None
            return norm(x, weight, a, bias)
        weight = self.norms[name][layer][depth]
        if x.dim() == 3 and weight.dim() == 2:  # per-head norm, one weight per row
            weight = weight[:, None]
        return norm(x, weight, a)

    def _heads(
        self,
        layer: int,
        x: torch.Tensor,
        name: str,
        depth: torch.Tensor | int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """q or k [T, heads, D]: QK-norm (Gemma), then RoPE (partial for GPT-NeoX)."""
        a = self.arch
        x = x.view(x.shape[0], -1, a.head_dim)
        if a.qk_norm:
            x = self._norm(x, name, layer, depth)
        return apply_rope(x, cos, sin)

    def _kv(
        self,
        layer: int,
        h: torch.Tensor,
        depth: torch.Tensor | int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.arch
        k, v = self._project(KV, layer, h, depth)
        k = self._heads(layer, k, "k", depth, cos, sin)
        return k, v.view(-1, a.num_kv_heads, a.head_dim)

    def rope_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin of ``positions`` for each RoPE base: once per pass (or fill), not per layer."""
        return [rope_cos_sin(f, positions, dtype) for f in self.rotary.inv_freqs]

    def kv_projection(
        self,
        layer: int,
        hidden: torch.Tensor,
        depth: torch.Tensor | int,
        positions: torch.Tensor,
        tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V that block layer ``layer`` at ``depth`` would write if its input were ``hidden``.

        This is CALM-style state propagation: an exited token's hidden state stands in for
        the inputs of the loops it skipped, so later tokens have K/V to attend to there.
        """
        if tables is None:  # ``rope_tables(positions)``, when the caller has them
            tables = self.rope_tables(positions, hidden.dtype)
        cos, sin = self.rotary.select(tables, layer, depth)
        h = self._norm(hidden, "input", layer, depth)
        return self._kv(layer, h, depth, cos, sin)

    def fill_kv(
        self,
        hidden: torch.Tensor,
        depth: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
    ) -> None:
        """``kv_projection`` of every block layer for rows [R, H] at their ``depth`` [R],
        written to the caches at ``slots`` [R]: one C++ call for all layers where the model has
        the one-call layer and the rows are sorted by depth, else the Python projection."""
        tables = self.rope_tables(positions, hidden.dtype)  # once for every layer
        fast = self.decode_layer
        segments = None
        if fast is not None and fast.applies(hidden):
            segments = fast.fill_segments(depth)
        layers = range(self.stack_layers)
        if fast is not None and segments is not None:
            rope = [self.rotary.select(tables, layer, depth) for layer in layers]
            cos, sin = [c for c, _ in rope], [s for _, s in rope]
            fast.fill(segments, hidden, cos, sin, k_caches, v_caches, slots)
            return
        for layer in layers:
            k, v = self.kv_projection(layer, hidden, depth, positions, tables)
            write_kv(k, v, k_caches[layer], v_caches[layer], slots)

    def _biased(self, group: tuple[str, ...]) -> bool:
        return any(m in self.biases for m in group)

    def _mlp(self, layer: int, h: torch.Tensor, depth: torch.Tensor | int) -> torch.Tensor:
        a = self.arch
        act = a.hidden_act
        fused = self.fused.get(GATE_UP)
        if a.gated_mlp and act == "silu" and fused is not None and not self._biased(GATE_UP):
            # silu(gate) · up straight from the fused gate|up output, one pass
            inner = silu_mul(fused(layer, h, depth), a.intermediate_size)
        elif a.gated_mlp:
            gate, up = self._project(GATE_UP, layer, h, depth)
            inner = activate(gate, act) * up
        else:  # GPT-NeoX: up, activation, down
            inner = activate(self._linear("up", layer, h, depth), act)
        return self._linear("down", layer, inner, depth)

    def attention_inputs(
        self,
        layer: int,
        hidden: torch.Tensor,
        depth: torch.Tensor | int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block layer up to attention: q, k, v [T, heads, D] of rows [T, H] (the piece a
        compiled pass runs before its split at attention, ``model.compiled_block``)."""
        a = self.arch
        h = self._norm(hidden, "input", layer, depth)
        q, k, v = self._project(QKV, layer, h, depth)
        q = self._heads(layer, q, "q", depth, cos, sin)
        if a.attn_scale != a.head_dim**-0.5:  # backends scale by D^-0.5: fold the rest into q
            q = q * (a.attn_scale * a.head_dim**0.5)
        k = self._heads(layer, k, "k", depth, cos, sin)
        return q, k, v.view(-1, a.num_kv_heads, a.head_dim)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        depth: torch.Tensor | int,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        """The backend's attention of block layer ``layer``, with the window of each row's
        position where the model has sliding windows: [T, heads · D]."""
        window = None if self.windows is None else self.windows.at(layer, depth)
        if window is None:
            return attention(layer, q, k, v)
        # a backend that cannot window must fail here, not attend too far
        return attention(layer, q, k, v, window=window)

    def attention_output(
        self, layer: int, hidden: torch.Tensor, out: torch.Tensor, depth: torch.Tensor | int
    ) -> torch.Tensor:
        """A block layer from its attention output ``out`` on: o, the residual, the MLP."""
        a = self.arch
        o = self._linear("o", layer, out, depth)
        if a.sandwich_norm:
            o = self._norm(o, "attn_out", layer, depth)
        if a.parallel_residual:  # GPT-NeoX: attention and MLP both read the layer's input
            return (
                hidden + o + self._mlp(layer, self._norm(hidden, "post_attn", layer, depth), depth)
            )
        if a.norm == "rms":  # the residual add fused into the post-attention norm
            weight = self.post_attn_norm[layer][depth]
            hidden, h = add_rms_norm(hidden, o, weight, a.rms_norm_eps)
        else:
            hidden = hidden + o
            h = self._norm(hidden, "post_attn", layer, depth)
        m = self._mlp(layer, h, depth)
        if a.sandwich_norm:
            m = self._norm(m, "mlp_out", layer, depth)
        return hidden + m

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
        q, k, v = self.attention_inputs(layer, hidden, depth, cos, sin)
        out = self.attend(layer, q, k, v, depth, attention)
        return self.attention_output(layer, hidden, out, depth)

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
        norms, RoPE base and window (per position) and the KV the backend reads for their depth.
        """
        tables = self.rope_tables(positions, hidden.dtype)
        fast = self.decode_layer
        inputs = segments = None
        if fast is not None and fast.applies(hidden):
            segments = fast.segments(depth, hidden.shape[0])  # once, not per layer
            inputs = None if segments is None else attention.decode_inputs()
        for layer in range(self.stack_layers):
            cos, sin = self.rotary.select(tables, layer, depth)
            if inputs is not None and segments is not None:
                hidden = fast(layer, segments, hidden, cos, sin, inputs)
            else:
                hidden = self.layer_forward(layer, hidden, depth, cos, sin, attention)
        return hidden


class RecursiveLM(LayerStack):
    """Decoder-only LM whose layer stack is a K-layer block looped ``config.loops`` times
    (the model itself is that block's ``LayerStack``), with a middle-cycle layout's unique
    first and last layers as the stacks ``prefix`` and ``suffix`` (None in the full cycle).

    A token's path: ``embed_tokens``, ``enter`` (prefix), ``block_forward`` once per loop,
    ``leave`` (suffix) on the hidden state after the loop it exits at, ``exit_logits``.
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        a, k_, b_ = config.arch, config.block_layers, config.loops
        ranks = config.recursion.ranks
        super().__init__(a, k_, b_, ranks, config.prefix_layers, dtype, device)
        self.config = config
        kw = {"dtype": dtype, "device": device}
        self.embed = nn.Parameter(torch.zeros(a.vocab_size, a.hidden_size, **kw))
        self.lm_head = (
            None
            if a.tie_word_embeddings
            else nn.Parameter(torch.zeros(a.vocab_size, a.hidden_size, **kw))
        )
        self.final_norm = nn.Parameter(torch.ones(a.hidden_size, **kw))
        self.final_norm_bias = (
            nn.Parameter(torch.zeros(a.hidden_size, **kw)) if a.norm == "layer" else None
        )
        dense = dict.fromkeys(a.linear_modules, 0)
        p_, e_ = config.prefix_layers, config.suffix_layers
        self.prefix: LayerStack | None = None
        self.suffix: LayerStack | None = None
        if p_:
            self.prefix = LayerStack(a, p_, 1, dense, 0, dtype, device)
        if e_:
            self.suffix = LayerStack(a, e_, 1, dense, a.num_layers - e_, dtype, device)
        self.exit_heads = ExitHeads(b_ - 1, a.hidden_size, **kw) if config.exit_heads else None
        # the checkpoint's own (wider) copies of the shared weights and LoRA factors, kept by
        # ``load_model(..., keep_full_precision=True)`` until ``materialise_high_rank`` sums
        # them into dense weights: summing the narrowed copies instead rounds twice, and a
        # bf16 exact conversion then no longer computes its source model's bf16 weights
        self.full_precision: dict[str, torch.Tensor] = {}
        self.packed_head: Callable[[torch.Tensor], torch.Tensor] | None = None
        # what the checkpoint holds, before a serving transform frees what it replaced
        self.checkpoint_parameters = self.num_parameters()

    @property
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies of the global-attention layers (all layers, but Gemma's)."""
        return self.rotary.inv_freqs[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[input_ids]
        scale = self.config.arch.embed_scale
        # Gemma: x · √H with the scale rounded to the weights' dtype first, as transformers does
        return x if scale == 1.0 else x * torch.tensor(scale, dtype=x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: the exit head, applicable after any loop."""
        h = norm(hidden, self.final_norm, self.config.arch, self.final_norm_bias)
        if self.packed_head is not None:
            return self.packed_head(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
        head = self.embed if self.lm_head is None else self.lm_head
        return h @ head.T

    def exit_logits(self, hidden: torch.Tensor, depth: int | Sequence[int]) -> torch.Tensor:
        """Logits of rows leaving after loop ``depth`` (an int, or one per row of [R, H]):
        that depth's learned exit head, where the checkpoint has heads, then ``logits``."""
        if self.exit_heads is not None:
            hidden = self.exit_heads(hidden, depth)
        return self.logits(hidden)

    def enter(
        self, hidden: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend
    ) -> torch.Tensor:
        """Embedded rows [T, H] through the unique first layers, once per token before loop 0
        (middle-cycle; the identity in the full cycle). ``attention`` serves the prefix
        layers' own K/V: one depth, layer i of the stack as its layer i."""
        if self.prefix is None:
            return hidden
        return self.prefix.block_forward(hidden, 0, positions, attention)

    def leave(
        self, hidden: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend
    ) -> torch.Tensor:
        """Rows [T, H] that exit, after whichever loop, through the unique last layers: the
        exit state that ``exit_logits`` reads (the identity in the full cycle). Each token
        passes them once, at its exit depth; ``attention`` serves their own K/V."""
        if self.suffix is None:
            return hidden
        return self.suffix.block_forward(hidden, 0, positions, attention)

    def loop_hidden_states(
        self, input_ids: torch.Tensor, num_loops: int | None = None
    ) -> list[torch.Tensor]:
        """Full-sequence forward without cache; the exit state of each loop.

        input_ids: [N, S] -> list of ``num_loops`` tensors [N, S, H]. Entry b is what every
        position would hand the exit head and LM head if all exited after loop b:
        ``leave(block^(b+1)(enter(embed)))`` — the block's output itself in the full cycle.
        Loop b + 1 reads the block's output, not that exit state.
        """
        n_loops = self.config.loops if num_loops is None else num_loops
        if not 1 <= n_loops <= self.config.loops:
            raise ValueError(f"num_loops must be in [1, {self.config.loops}], got {n_loops}")
        n, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).repeat(n)
        attention = CausalAttention([s] * n)
        hidden = self.enter(self.embed_tokens(input_ids.reshape(-1)), positions, attention)
        states = []
        for b in range(n_loops):
            hidden = self.block_forward(hidden, b, positions, attention)
            states.append(self.leave(hidden, positions, attention).view(n, s, -1))
        return states

    def forward(self, input_ids: torch.Tensor, num_loops: int | None = None) -> torch.Tensor:
        """Logits [N, S, V] after ``num_loops`` loops (all by default)."""
        return self.logits(self.loop_hidden_states(input_ids, num_loops)[-1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
