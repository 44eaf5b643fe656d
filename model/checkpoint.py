"""Loading and saving checkpoints.

Two formats are read: a Hugging Face directory (``config.json`` + single or sharded
safetensors) as a vanilla model, and a loopserve directory (``loopserve.json`` +
``model.safetensors``) as written by conversion or uptraining. Tokenizer files travel along.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ArchConfig, ConfigError, ModelConfig
from model.recursive import RecursiveLM

LOOPSERVE_CONFIG = "loopserve.json"
WEIGHTS_FILE = "model.safetensors"
EXIT_HEADS_FILE = "exit_heads.safetensors"
"""Learned exit heads, beside the weights: calibration adds or replaces them without
rewriting the model, and a checkpoint without them loads as before."""
EXIT_HEADS_PREFIX = "exit_heads."
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
HF_LINEAR_NAMES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, malformed or unsupported."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_FILE
    if single.exists():
        return [single]
    if any(directory.glob("*.bin")):
        raise CheckpointError(
            f"{directory} holds PyTorch .bin weights; only safetensors checkpoints are supported"
        )
    raise CheckpointError(f"no {WEIGHTS_FILE} or model.safetensors.index.json in {directory}")


def _read_file(f: Path) -> dict[str, torch.Tensor]:
    if not f.exists():
        raise CheckpointError(f"missing weight file {f}")
    try:
        with safe_open(str(f), framework="pt") as st:
            return {name: st.get_tensor(name) for name in st.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own untyped errors
        raise CheckpointError(f"cannot read {f}: {e}") from e


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(directory):
        tensors.update(_read_file(f))
    return tensors


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"checkpoint is missing tensor {name!r}")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


# our per-position norm -> the HF layer's module name, per family (Gemma 3's post_attention_
# layernorm normalises the attention output; its pre_feedforward_layernorm is our post_attn_norm)
HF_NORM_NAMES: dict[str, dict[str, str]] = {
    "llama": {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm"},
    "gpt_neox": {
        "input_norm": "input_layernorm.weight",
        "post_attn_norm": "post_attention_layernorm.weight",
        "norms.input_bias": "input_layernorm.bias",
        "norms.post_attn_bias": "post_attention_layernorm.bias",
    },
    "gemma3_text": {
        "input_norm": "input_layernorm",
        "post_attn_norm": "pre_feedforward_layernorm",
        "norms.attn_out": "post_attention_layernorm",
        "norms.mlp_out": "post_feedforward_layernorm",
        "norms.q": "self_attn.q_norm",
        "norms.k": "self_attn.k_norm",
    },
}
NEOX_LINEAR_NAMES: dict[str, str] = {
    "o": "attention.dense",
    "up": "mlp.dense_h_to_4h",
    "down": "mlp.dense_4h_to_h",
}


def _hf_layer(
    arch: ArchConfig, tensors: dict[str, torch.Tensor], i: int
) -> dict[str, torch.Tensor]:
    """Original layer i's tensors under our names (``weights.q``, ``biases.q``, norms)."""
    neox = arch.model_type == "gpt_neox"
    prefix = f"gpt_neox.layers.{i}." if neox else f"model.layers.{i}."
    out: dict[str, torch.Tensor] = {}
    if neox:  # q|k|v fused, interleaved per head: [heads, (q, k, v), D, in]
        shape = (3 * arch.q_size, arch.hidden_size)
        qkv = _take(tensors, f"{prefix}attention.query_key_value.weight", shape)
        qkv = qkv.view(arch.num_heads, 3, arch.head_dim, arch.hidden_size)
        bias = None
        if "q" in arch.bias_modules:
            name = f"{prefix}attention.query_key_value.bias"
            bias = _take(tensors, name, (3 * arch.q_size,)).view(arch.num_heads, 3, arch.head_dim)
        for j, m in enumerate(("q", "k", "v")):
            out[f"weights.{m}"] = qkv[:, j].reshape(arch.q_size, arch.hidden_size)
            if bias is not None:
                out[f"biases.{m}"] = bias[:, j].reshape(arch.q_size)
    names = NEOX_LINEAR_NAMES if neox else HF_LINEAR_NAMES
    for m in arch.linear_modules:
        if f"weights.{m}" in out:
            continue
        out[f"weights.{m}"] = _take(tensors, f"{prefix}{names[m]}.weight", arch.linear_shape(m))
        if m in arch.bias_modules:
            out[f"biases.{m}"] = _take(
                tensors, f"{prefix}{names[m]}.bias", (arch.linear_shape(m)[0],)
            )
    norms = HF_NORM_NAMES.get(arch.model_type, HF_NORM_NAMES["llama"])
    for ours, hf in norms.items():
        size = arch.norm_size(ours.removeprefix("norms."))
        name = hf if hf.endswith((".weight", ".bias")) else f"{hf}.weight"
        out[ours] = _take(tensors, prefix + name, (size,))
    return out


def load_hf(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
) -> RecursiveLM:
    """A Hugging Face Llama/Qwen2/GPT-NeoX/Gemma 3 directory as a vanilla RecursiveLM."""
    d = Path(directory)
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d} has no config.json")
    try:
        arch = ArchConfig.from_hf(_read_json(d / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from e
    tensors = read_tensors(d)
    model = RecursiveLM(ModelConfig(arch=arch), dtype=dtype, device="meta")
    neox = arch.model_type == "gpt_neox"
    top = "gpt_neox." if neox else "model."
    vh = (arch.vocab_size, arch.hidden_size)
    state: dict[str, torch.Tensor] = {
        "embed": _take(tensors, top + ("embed_in" if neox else "embed_tokens") + ".weight", vh),
    }
    final = top + ("final_layer_norm" if neox else "norm")
    state["final_norm"] = _take(tensors, f"{final}.weight", (arch.hidden_size,))
    if arch.norm == "layer":
        state["final_norm_bias"] = _take(tensors, f"{final}.bias", (arch.hidden_size,))
    if not arch.tie_word_embeddings:
        head = "embed_out.weight" if neox and "embed_out.weight" in tensors else "lm_head.weight"
        state["lm_head"] = _take(tensors, head, vh)
    layers = [_hf_layer(arch, tensors, i) for i in range(arch.num_layers)]
    for name in layers[0]:
        t = torch.stack([layer[name] for layer in layers])
        # per-position tensors are [L, B = 1, ...]; shared weights [K = L, out, in]
        state[name] = t if name.startswith("weights.") else t[:, None]
    return _materialize(model, state, dtype, device)


# what ``materialise_high_rank`` sums into dense weights: kept at the checkpoint's precision
SUMMED_PREFIXES = ("weights.", "lora_a.", "lora_b.")


def _materialize(
    model: RecursiveLM,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | None,
    keep_full_precision: bool = False,
) -> RecursiveLM:
    """Replace a meta-device model's parameters with ``state`` (exact keys required).

    Building on "meta" first avoids allocating (and initialising) the weights twice.
    ``keep_full_precision``: where ``dtype`` is narrower than a summed tensor's, the wide
    tensor stays in ``model.full_precision`` (see there) on the CPU.
    """
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not match the config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    for name, param in model.state_dict().items():
        got, want = tuple(state[name].shape), tuple(param.shape)
        if got != want:
            raise CheckpointError(f"tensor {name!r} has shape {got}, expected {want}")
    model.load_state_dict(
        {k: v.to(dtype=dtype, device=device or "cpu") for k, v in state.items()}, assign=True
    )
    if keep_full_precision:
        model.full_precision = {
            k: v
            for k, v in state.items()
            if k.startswith(SUMMED_PREFIXES) and torch.finfo(v.dtype).bits > torch.finfo(dtype).bits
        }
    return model


def save_checkpoint(
    model: RecursiveLM,
    directory: str | Path,
    provenance: dict[str, Any] | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a loopserve checkpoint: ``loopserve.json`` (config + provenance) and weights."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    heads = {k: state.pop(k) for k in list(state) if k.startswith(EXIT_HEADS_PREFIX)}
    save_file(state, str(d / WEIGHTS_FILE), metadata={"format": "pt"})
    if heads:
        save_file(heads, str(d / EXIT_HEADS_FILE), metadata={"format": "pt"})
    else:
        (d / EXIT_HEADS_FILE).unlink(missing_ok=True)
    meta = {"format": "loopserve", "version": 1, "config": model.config.to_dict()}
    meta["provenance"] = provenance or {}
    (d / LOOPSERVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, d)
    return d


def save_exit_heads(model: RecursiveLM, directory: str | Path) -> Path:
    """Write only the model's exit heads into a checkpoint (its weights stay as they are)."""
    if model.exit_heads is None:
        raise CheckpointError("the model has no exit heads to save")
    state = {
        EXIT_HEADS_PREFIX + k: v.detach().contiguous().cpu()
        for k, v in model.exit_heads.state_dict().items()
    }
    path = Path(directory) / EXIT_HEADS_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.exists():
            shutil.copy2(f, Path(dst) / name)


def read_loopserve_meta(directory: str | Path) -> dict[str, Any]:
    return _read_json(Path(directory) / LOOPSERVE_CONFIG)


def load_loopserve(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    keep_full_precision: bool = False,
) -> RecursiveLM:
    d = Path(directory)
    meta = read_loopserve_meta(d)
    if meta.get("format") != "loopserve" or "config" not in meta:
        raise CheckpointError(f"{d / LOOPSERVE_CONFIG} is not a loopserve checkpoint config")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{d / LOOPSERVE_CONFIG}: {e}") from e
    model = RecursiveLM(config, dtype=dtype, device="meta")
    tensors = read_tensors(d)
    if config.exit_heads:
        tensors.update(_read_file(d / EXIT_HEADS_FILE))
    return _materialize(model, tensors, dtype, device, keep_full_precision)


def load_model(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    keep_full_precision: bool = False,
) -> RecursiveLM:
    """Load either format, deciding by the config file present (``keep_full_precision``:
    see ``RecursiveLM.full_precision``; an original model has nothing to sum)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    if (d / LOOPSERVE_CONFIG).exists():
        return load_loopserve(d, dtype, device, keep_full_precision)
    return load_hf(d, dtype, device)
