"""Compute kernels: Triton implementations, their pure-torch twins, and the dispatch."""

from kernels.lora_linear import lora_linear, lora_linear_ref

__all__ = ["lora_linear", "lora_linear_ref"]
