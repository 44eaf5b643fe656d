"""Compute kernels: Triton implementations, their pure-torch twins, and the dispatch."""

from kernels.dense_lora import dense_per_depth_linear, materialise_dense, prefer_dense
from kernels.lora_linear import (
    FusedLoRA,
    fuse_lora,
    fused_lora_linear,
    lora_linear,
    lora_linear_ref,
)

__all__ = [
    "FusedLoRA",
    "PagedAttentionMetadata",
    "dense_per_depth_linear",
    "fuse_lora",
    "fused_lora_linear",
    "lora_linear",
    "lora_linear_ref",
    "materialise_dense",
    "paged_attention",
    "prefer_dense",
    "write_kv",
]
