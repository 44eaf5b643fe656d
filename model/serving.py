"""Inference-time transforms of a loaded model (the checkpoint stays as it is).

Applied once at load, in this order:

1. ``materialise_high_rank``: at high rank the low-rank path (shrink + expand on top of the
   shared GEMM) costs more than a plain per-depth weight — the exact default model is full rank,
   where ``W + B_p A_p`` *is* the original layer. Such modules get one dense weight per position
   and run a grouped matmul over depth segments; the shared weight and factors they replace are
   freed, so the exact default holds the original's weights once, not 2.4 times.
2. ``fuse_projections``: q|k|v and gate|up read the same input; concatenated along their outputs
   they run as one matmul each (7 → 4 per layer), which a small decode batch turns into fewer,
   better-shaped GEMMs. The separate weights are freed.
3. ``pack_weights`` (float32, or bf16 on a CPU with native bf16): every weight — dense per-depth, or
   shared with its low-rank deltas packed beside it — is laid out once for the CPU GEMM (oneDNN's
   layout, or panels for the C++ GEMMs; ``loopserve_kernels.packed_linear``), where ``F.linear``
   would reorder a bf16 weight on every call. The unpacked copies are freed — except the LM head's
   when it is tied to the embedding, which token lookup still reads: a second copy of ``vocab ×
   hidden`` (57 MB for SmolLM2 in bf16) buys a head GEMM 2.5× faster for one row, 1.5× for 32 (8.8 →
   3.4 ms, 10.5 → 7.1 ms on the 2-core Xeon).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loopserve_kernels import (
    FusedLoRA,
    PackedWeight,
    cpu_kernel_available,
    fuse_lora,
    materialise_dense,
    packing_supported,
    prefer_dense,
)
from model.fused_layer import DecodeLayer, fits
from model.fused_projection import Delta, FusedProjection, PackedDelta, TransposedDelta
from model.packed_projection import PackedProjection, pack_stack
from model.recursive import GATE_UP, KV, QKV, RecursiveLM

FUSED_GROUPS: tuple[tuple[str, ...], ...] = (QKV, GATE_UP)


def _free(param: nn.Parameter) -> None:
    """Drop a parameter's storage in place (its name stays, so the module's layout does)."""
    param.data = param.data.new_empty(0)


@torch.no_grad()
def materialise_high_rank(model: RecursiveLM, force: bool | None = None) -> list[str]:
    """Switch modules whose rank makes dense cheaper to per-position dense weights.

    ``force`` True/False overrides the shape-based rule (for benchmarks). Returns the modules
    switched; their shared weights and LoRA factors are freed (not changed in the checkpoint).
    The sums read ``model.full_precision`` where the loader kept it, and it is dropped after.
    """
    switched = []
    wide = model.full_precision
    for m, a in model.lora_a.items():
        out_f, in_f = model.config.arch.linear_shape(m)
        rank = a.shape[2]
        if not (prefer_dense(out_f, in_f, rank) if force is None else force):
            continue
        w, b = model.weights[m], model.lora_b[m]
        src = [
            wide.get(f"{kind}.{m}", t) for kind, t in (("weights", w), ("lora_a", a), ("lora_b", b))
        ]
        model.dense[m] = torch.stack(
            [
                materialise_dense(src[0][k], src[1][k], src[2][k]).to(w.device, w.dtype)
                for k in range(model.config.block_layers)
            ]
        )
        for p in (w, a, b):
            _free(p)
        switched.append(m)
    model.full_precision = {}
    return switched


@torch.no_grad()
def fuse_projections(model: RecursiveLM) -> list[tuple[str, ...]]:
    """Fuse each group whose modules are all dense, or all shared weight + LoRA; returns the
    groups fused. Call after ``materialise_high_rank``."""
    fused = []
    arch, layers, loops = model.config.arch, model.config.block_layers, model.config.loops
    for group in FUSED_GROUPS:
        if not set(group) <= set(arch.linear_modules):  # GPT-NeoX's MLP has no gate
            continue
        sizes = tuple(arch.linear_shape(m)[0] for m in group)
        kinds = {m in model.dense for m in group}
        if len(kinds) != 1:
            continue
        if kinds == {True}:
            proj = FusedProjection(
                group, sizes, dense=torch.cat([model.dense.pop(m) for m in group], 2)
            )
        else:
            weight = torch.cat([model.weights[m] for m in group], 1)
            lora = None
            if any(m in model.lora_a for m in group):
                in_f = arch.linear_shape(group[0])[1]
                empty_a = weight.new_zeros(loops, 0, in_f)
                lora = [
                    fuse_lora(
                        [model.lora_a[m][k] if m in model.lora_a else empty_a for m in group],
                        [
                            model.lora_b[m][k]
                            if m in model.lora_b
                            else weight.new_zeros(loops, s, 0)
                            for m, s in zip(group, sizes, strict=True)
                        ],
                    )
                    for k in range(layers)
                ]
                for m in group:
                    if m in model.lora_a:
                        _free(model.lora_a[m])
                        _free(model.lora_b[m])
            for m in group:
                _free(model.weights[m])
            proj = FusedProjection(group, sizes, weight=weight, lora=lora)
        model.fused[group] = proj
        if group == QKV:
            model.fused[KV] = proj.tail(len(KV))  # views: fills project K/V alone
        fused.append(group)
    return fused


def _pack_deltas(lora: list[FusedLoRA], loops: int) -> list[list[Delta]]:
    """Factors per (layer, depth): float32 ones transposed for the C++ low-rank GEMM where the
    kernels are built, the others packed for oneDNN."""
    transposed = lora[0].lora_a.dtype == torch.float32 and cpu_kernel_available()
    build = TransposedDelta.build if transposed else PackedDelta.pack
    return [[build(f, d) for d in range(loops)] for f in lora]


@torch.no_grad()
def pack_weights(model: RecursiveLM) -> list[tuple[str, ...]]:
    """Pack every weight that runs without a low-rank delta; returns the groups packed (none
    unless the model is float32 or bf16 on a CPU with native bf16 GEMMs). Call after the other
    two."""
    if not packing_supported(model.embed[:1]):
        return []
    packed: list[tuple[str, ...]] = []
    for group, proj in list(model.fused.items()):
        if group == KV or not isinstance(proj, FusedProjection):
            continue
        if proj.lora:  # the shared weight packed, the deltas beside it
            assert proj.weight is not None
            proj.packed = [PackedWeight.pack(w) for w in proj.weight]
            proj.packed_lora = _pack_deltas(proj.lora, model.config.loops)
            proj.weight = None
            if group == QKV:
                model.fused[KV] = proj.tail(len(KV))
            packed.append(group)
            continue
        stack = proj.dense if proj.dense is not None else proj.weight
        assert stack is not None
        model.fused[group] = PackedProjection(group, proj.sizes, pack_stack(stack))
        packed.append(group)
    arch, loops = model.config.arch, model.config.loops
    for m in arch.linear_modules:  # GPT-NeoX: no gate
        if any(m in group for group in model.fused):
            continue
        if m in model.dense:  # (its factors stay named in lora_a, freed)
            stack = model.dense.pop(m)
        elif m in model.lora_a:  # a lone module with deltas: packed weight + its factors
            lora = [
                fuse_lora([a], [b]) for a, b in zip(model.lora_a[m], model.lora_b[m], strict=True)
            ]
            weights = [PackedWeight.pack(w) for w in model.weights[m].data]
            for param in (model.weights[m], model.lora_a[m], model.lora_b[m]):
                _free(param)
            size = (arch.linear_shape(m)[0],)
            model.fused[(m,)] = FusedProjection(
                (m,), size, lora=lora, packed=weights, packed_lora=_pack_deltas(lora, loops)
            )
            packed.append((m,))
            continue
        else:
            stack = model.weights[m].data
            _free(model.weights[m])
        size = (model.config.arch.linear_shape(m)[0],)
        model.fused[(m,)] = PackedProjection((m,), size, pack_stack(stack))
        packed.append((m,))
    qkv = model.fused.get(QKV)
    if isinstance(qkv, PackedProjection):
        model.fused[KV] = qkv.tail(len(KV))
    if model.lm_head is None:
        model.packed_head = PackedWeight.pack(model.embed.data)
    else:
        model.packed_head = PackedWeight.pack(model.lm_head.data)
        _free(model.lm_head)
    packed.append(("lm_head",))
    return packed


@dataclass(frozen=True)
class ServingPlan:
    """What ``prepare_for_serving`` did, for the startup log."""

    dense: list[str]
    fused: list[tuple[str, ...]]
    packed: list[tuple[str, ...]]


def prepare_for_serving(model: RecursiveLM, compiled: bool = False) -> ServingPlan:
    """All three transforms, as the engine serves a model, then the one-call C++ decode layer
    where every layer fits it (``model.fused_layer``). ``compiled`` (a compiled block pass,
    ``model.compiled_block``): neither packing nor the C++ layer, whose calls the tracer cannot
    see into."""
    dense, fused = materialise_high_rank(model), fuse_projections(model)
    plan = ServingPlan(dense, fused, [] if compiled else pack_weights(model))
    if not compiled and fits(model):
        model.decode_layer = DecodeLayer.build(model)
    return plan
