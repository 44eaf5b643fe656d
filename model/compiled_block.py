"""The block pass compiled with torch.compile (inductor), piecewise, over padded row buckets.

Eager, every layer is a chain of small ops — norm, q|k|v, RoPE, o, residual, MLP — each its own
dispatch (on a GPU its own kernel launch: ~33 ms of launches a step at c = 1 on an H200,
benchmarks/RESULTS.md). As vLLM's piecewise compilation does, the dense parts between two
attentions are compiled into one graph each and attention stays eager, the split point: its
shapes follow the step's sequences and contexts, not its row count. A pass runs K + 1 pieces:
the first layer up to attention, then per boundary the end of layer l and the start of l + 1,
then the end of the last layer.

Rows are padded up to the next of a few row-count buckets, so each piece compiles once per
bucket (``dynamic=False``): the row counts a GPU would capture as CUDA graphs, which on CUDA
this asks for (``mode="reduce-overhead"``; untested on a GPU so far). Padded rows are zeros at
position 0 and never reach attention — it gets the real rows only — so they write no K/V and
read none; their outputs are dropped. Depth per row is a tensor in the graph (the per-depth
kernels' twins mask each depth's result instead of gathering rows, ``masked_per_depth``), so
rows at different depths share one graph; a model with per-depth dense weights keeps an int
depth for a one-depth pass (one graph per depth), where masking would run every depth's GEMM.

Not the CPU default: there the one-call C++ decode layer already runs a layer per call, and the
packed weights it and the prefill path read are opaque to the tracer (a model compiled here
must be prepared with ``prepare_for_serving(model, compiled=True)``, which leaves them out).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import ClassVar

import torch
import torch.nn.functional as F

from model.attention import AttentionBackend
from model.fused_projection import FusedProjection
from model.packed_projection import PackedProjection
from model.recursive import RecursiveLM

LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STRIDE = 256
"""Buckets past the ladder's top: multiples of this."""

Piece = Callable[..., tuple[torch.Tensor, ...]]


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """The default buckets: powers of two up to 256, then multiples of 256, up to the first
    that holds ``max_rows`` (a step's token budget)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    out = [b for b in LADDER if b < max_rows]
    size = next((b for b in LADDER if b >= max_rows), None)
    if size is None:  # the whole ladder is below: on in strides
        size = -(-max_rows // STRIDE) * STRIDE
        out.extend(range(LADDER[-1] + STRIDE, size, STRIDE))
    out.append(size)
    return tuple(out)


def _traceable(model: RecursiveLM) -> None:
    """Refuse projections whose weights run through oneDNN / C++ calls dynamo cannot trace."""
    for group, proj in model.fused.items():
        packed = isinstance(proj, PackedProjection) or (
            isinstance(proj, FusedProjection) and proj.packed is not None
        )
        if packed:
            raise ValueError(
                f"compiled block pass: projection {'|'.join(group)} has packed CPU weights; "
                "prepare the model with prepare_for_serving(model, compiled=True)"
            )


def _piece(
    model: RecursiveLM,
    before: int | None,
    after: int | None,
    hidden: torch.Tensor,
    out: torch.Tensor | None,
    depth: torch.Tensor | int,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Layer ``before`` from its attention output on, then layer ``after`` up to its
    attention: (hidden, q, k, v), or (hidden,) after the last layer."""
    if before is not None:
        assert out is not None
        hidden = model.attention_output(before, hidden, out, depth)
    if after is None:
        return (hidden,)
    assert cos is not None and sin is not None
    return (hidden, *model.attention_inputs(after, hidden, depth, cos, sin))


@cache
def _compiled(cuda_graphs: bool) -> Piece:
    """``_piece`` compiled: one graph per (model, layers, bucket, depth form), shared by every
    pass over the same model."""
    return torch.compile(
        _piece,
        backend="inductor",
        dynamic=False,
        fullgraph=True,
        mode="reduce-overhead" if cuda_graphs else None,
    )


class CompiledBlockPass:
    """``model.block_forward``'s drop-in: the same pass, compiled per bucket (see the module)."""

    graphs: ClassVar[int] = 0

    def __init__(self, model: RecursiveLM, buckets: tuple[int, ...]) -> None:
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be ascending and >= 1, got {buckets}")
        _traceable(model)
        self.model = model
        self.buckets = buckets
        self.cuda_graphs = model.device.type == "cuda"
        self.int_depth = model.has_dense_weights
        self.piece = _compiled(self.cuda_graphs)
        # the graphs of every pass made in this process share ``_piece``'s cache: its
        # recompile limit is their sum (each piece, K + 1, at each bucket and depth form), so
        # a bucket past it fails loudly instead of turning eager without a word
        forms = model.config.loops + 1 if self.int_depth else 1
        CompiledBlockPass.graphs += (model.config.block_layers + 1) * len(buckets) * forms

    def bucket(self, rows: int) -> int | None:
        """The bucket ``rows`` pad up to; None above the largest (that pass runs eager)."""
        return next((b for b in self.buckets if b >= rows), None)

    def __call__(
        self,
        hidden: torch.Tensor,
        depth: torch.Tensor | int,
        positions: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        """One pass of the block over rows [T, H] at ``depth`` (an int, or [T]), as
        ``RecursiveLM.block_forward``."""
        n = hidden.shape[0]
        size = self.bucket(n)
        if size is None:  # above the largest bucket: eager, as vLLM past its largest capture
            return self.model.block_forward(hidden, depth, positions, attention)
        pad = size - n
        if isinstance(depth, int) and not self.int_depth:
            depth = torch.full((n,), depth, dtype=torch.int64, device=hidden.device)
        padded_depth = depth
        if isinstance(depth, torch.Tensor):  # the last row's depth: still sorted, in range
            padded_depth = torch.cat([depth, depth[-1:].expand(pad)])
        x = F.pad(hidden, (0, 0, 0, pad))
        tables = self.model.rope_tables(F.pad(positions, (0, pad)), hidden.dtype)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        layers = self.model.config.block_layers
        before: int | None = None
        out: torch.Tensor | None = None
        with torch._dynamo.config.patch(
            recompile_limit=CompiledBlockPass.graphs,
            accumulated_recompile_limit=max(CompiledBlockPass.graphs, 256),
            fail_on_recompile_limit_hit=True,
        ):
            for layer in range(layers):
                cos, sin = self.model.rotary.select(tables, layer, padded_depth)
                x, q, k, v = self.piece(self.model, before, layer, x, out, padded_depth, cos, sin)
                real = self.model.attend(layer, q[:n], k[:n], v[:n], depth, attention)
                out = F.pad(real, (0, 0, 0, pad))
                before = layer
            (x,) = self.piece(self.model, before, None, x, out, padded_depth, None, None)
        # under CUDA graphs the output lives in the graph's pool, which the next replay reuses
        return x[:n].clone() if self.cuda_graphs else x[:n]
