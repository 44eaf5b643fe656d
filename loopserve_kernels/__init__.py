"""Compute kernels: Triton implementations, their pure-torch twins, and the dispatch.

Callers use the names below; ``loopserve_kernels.dispatch`` picks the implementation per call.
"""

from loopserve_kernels.cpu_kernels import (
    cpu_kernel_available,
    decode_layer_cpu,
    fill_kv_layers_cpu,
    low_rank_delta_cpu,
)
from loopserve_kernels.dense_lora import dense_per_depth_linear, materialise_dense, prefer_dense
from loopserve_kernels.dispatch import cpu_kernel_mode, use_backend
from loopserve_kernels.logit_stats import row_max_lse
from loopserve_kernels.lora_linear import (
    FusedLoRA,
    fuse_lora,
    fused_lora_linear,
    lora_linear,
    lora_linear_ref,
)
from loopserve_kernels.packed_linear import PackedWeight, packing_supported
from loopserve_kernels.paged_attention import DecodeInputs, decode_inputs, paged_attention, write_kv
from loopserve_kernels.paged_metadata import PagedAttentionMetadata

__all__ = [
    "DecodeInputs",
    "FusedLoRA",
    "PackedWeight",
    "PagedAttentionMetadata",
    "cpu_kernel_available",
    "cpu_kernel_mode",
    "decode_inputs",
    "decode_layer_cpu",
    "dense_per_depth_linear",
    "fill_kv_layers_cpu",
    "fuse_lora",
    "fused_lora_linear",
    "lora_linear",
    "lora_linear_ref",
    "low_rank_delta_cpu",
    "materialise_dense",
    "packing_supported",
    "paged_attention",
    "prefer_dense",
    "row_max_lse",
    "use_backend",
    "write_kv",
]
