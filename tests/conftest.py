"""Shared fixtures: tiny random Llama checkpoints written by transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    """A 6-layer GQA Llama small enough for exhaustive tests; overrides change any field."""
    kw: dict[str, object] = {
        "vocab_size": 101,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_hf_model(directory: Path, config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """Random weights with non-trivial norms (so per-position norms matter), saved to disk."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    d = tmp_path_factory.mktemp("tiny_llama")
    return d, write_hf_model(d, tiny_llama_config())
