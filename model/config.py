"""Model configuration: the architecture of a Llama-family decoder and its recursion.

A vanilla model is the special case ``loops=1`` with every LoRA rank 0; one config type
describes both so that one implementation serves both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

LINEAR_MODULES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_MODULES: tuple[str, ...] = ("q", "k", "v", "o")
MLP_MODULES: tuple[str, ...] = ("gate", "up", "down")
FULL_RANK = -1  # in a rank spec: the module's full rank (min(out, in)), exact conversion
INIT_METHODS: tuple[str, ...] = ("stepwise", "average", "lower", "random")
QKV_MODULES: tuple[str, ...] = ("q", "k", "v")
# model_type -> its family's HF config reader (below ArchConfig)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gpt_neox", "gemma3_text")
NORM_KINDS: tuple[str, ...] = ("rms", "rms_offset", "layer")  # w·x̂, (1 + w)·x̂, LayerNorm
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh")
HF_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


class ConfigError(ValueError):
    """A checkpoint config that loopserve cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` is Llama-3.1's smooth interpolation, ``linear``
    divides all positions by ``factor``."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported "
                "(supported: default, linear, llama3)"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ArchConfig:
    """The dense architecture. ``num_layers`` is the unrolled depth L (= K · B, or P + K · B + E
    in a middle-cycle layout).

    The defaults are Llama; the family fields below them describe GPT-NeoX (LayerNorm with
    bias, ungated MLP, parallel residual, partial rotary, biased projections) and Gemma 3
    ((1 + w) RMSNorm, sandwich norms, QK-norm, scaled embeddings, a sliding window and a RoPE
    base per layer). ``layer_windows[p]`` is original layer p's window (0: global attention);
    sliding layers use ``local_rope_theta`` (unscaled) when it is set.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    model_type: str = "llama"
    norm: str = "rms"
    hidden_act: str = "silu"
    gated_mlp: bool = True
    parallel_residual: bool = False
    sandwich_norm: bool = False
    qk_norm: bool = False
    embed_scale: float = 1.0
    rotary_dim: int = 0
    bias_modules: tuple[str, ...] = ()
    attn_scale: float = 0.0
    layer_windows: tuple[int, ...] = ()
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        self._check_family()

    def _check_family(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ConfigError(f"norm={self.norm!r} is not one of {', '.join(NORM_KINDS)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        # JSON round trips turn tuples into lists
        bias = tuple(self.bias_modules) or (QKV_MODULES if self.attention_bias else ())
        object.__setattr__(self, "bias_modules", bias)
        object.__setattr__(self, "attention_bias", bool(set(bias) & set(QKV_MODULES)))
        object.__setattr__(self, "layer_windows", tuple(int(w) for w in self.layer_windows))
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"rotary dimension {self.rotary_dim} must be even and in (0, {self.head_dim}]"
            )
        unknown = set(bias) - set(self.linear_modules)
        if unknown:
            raise ConfigError(f"biases on unknown module(s) {sorted(unknown)}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"{len(self.layer_windows)} sliding windows for {self.num_layers} layers"
            )
        if any(w < 0 for w in self.layer_windows):
            raise ConfigError(f"sliding windows must be >= 0, got {self.layer_windows}")

    @property
    def linear_modules(self) -> tuple[str, ...]:
        """The linear maps a layer has: an ungated MLP (GPT-NeoX) has no ``gate``."""
        return LINEAR_MODULES if self.gated_mlp else tuple(m for m in LINEAR_MODULES if m != "gate")

    @property
    def position_norms(self) -> tuple[str, ...]:
        """Per-position norm tensors besides ``input_norm`` / ``post_attn_norm``: LayerNorm
        biases, Gemma's norms on the attention and MLP outputs, QK-norm weights."""
        names: tuple[str, ...] = ()
        if self.norm == "layer":
            names += ("input_bias", "post_attn_bias")
        if self.sandwich_norm:
            names += ("attn_out", "mlp_out")
        if self.qk_norm:
            names += ("q", "k")
        return names

    def norm_size(self, name: str) -> int:
        return self.head_dim if name in ("q", "k") else self.hidden_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of a linear map."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q": (self.q_size, h),
            "k": (self.kv_size, h),
            "v": (self.kv_size, h),
            "o": (h, self.q_size),
            "gate": (i, h),
            "up": (i, h),
            "down": (h, i),
        }[module]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ArchConfig:
        """Build from a Hugging Face ``config.json`` dict, rejecting what we cannot serve."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model_type={model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if not isinstance(cfg.get(name), int):
                raise ConfigError(f"config field {name!r} is missing or not an integer")
        num_heads = cfg.get("num_attention_heads")
        if not isinstance(num_heads, int):
            raise ConfigError("config field 'num_attention_heads' is missing or not an integer")
        act_key = "hidden_activation" if model_type == "gemma3_text" else "hidden_act"
        act = cfg.get(act_key) or "silu"
        if act not in HF_ACTIVATIONS:
            raise ConfigError(f"{act_key}={act!r} is not supported ({', '.join(HF_ACTIVATIONS)})")
        if cfg.get("use_sliding_window") and model_type != "gemma3_text":
            raise ConfigError("use_sliding_window=true is not supported")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        common: dict[str, Any] = {
            "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg["intermediate_size"],
            "num_layers": cfg["num_hidden_layers"],
            "num_heads": num_heads,
            "num_kv_heads": cfg.get("num_key_value_heads") or num_heads,
            "head_dim": cfg.get("head_dim") or 0,
            "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
            "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": eos_ids,
            "model_type": model_type,
            "hidden_act": HF_ACTIVATIONS[act],
        }
        family = {"gpt_neox": _gpt_neox_fields, "gemma3_text": _gemma3_fields}.get(
            model_type, _llama_fields
        )
        return cls(**(common | family(cfg)))


def _rope_fields(
    params: dict[str, Any] | None, theta: float | None
) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from a ``rope_scaling`` / ``rope_parameters`` dict."""
    rope = None
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rtype = params.get("rope_type", params.get("type", "default"))
        if rtype != "default":
            rope = RopeScaling(
                rope_type=rtype,
                factor=float(params.get("factor", 1.0)),
                low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", 8192)
                ),
            )
    return float(theta if theta is not None else 10000.0), rope


def _llama_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Llama and Qwen2: Llama's ``attention_bias`` biases q, k, v and o; Qwen2 has q/k/v bias."""
    theta, rope = _rope_fields(
        cfg.get("rope_scaling") or cfg.get("rope_parameters"), cfg.get("rope_theta")
    )
    if cfg["model_type"] == "qwen2":
        bias = QKV_MODULES
    else:
        bias = (*QKV_MODULES, "o") if cfg.get("attention_bias") else ()
        bias += ("gate", "up", "down") if cfg.get("mlp_bias") else ()
    return {"rope_theta": theta, "rope_scaling": rope, "bias_modules": bias}


def _gpt_neox_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX / Pythia: LayerNorm, ungated biased MLP, partial rotary, (parallel) residual."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta, rope = _rope_fields(params, cfg.get("rotary_emb_base"))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    pct = params.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))
    bias = (*QKV_MODULES, "o") if cfg.get("attention_bias", True) else ()
    return {
        "rope_theta": theta,
        "rope_scaling": rope,
        "norm": "layer",
        "rms_norm_eps": float(cfg.get("layer_norm_eps", 1e-5)),
        "gated_mlp": False,
        "parallel_residual": bool(cfg.get("use_parallel_residual", True)),
        "rotary_dim": int(head_dim * pct),
        "bias_modules": (*bias, "up", "down"),
    }


def _gemma3_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 text: sliding layers with their own (unscaled) RoPE base, global layers with
    ``rope_theta`` and its scaling; logit soft-capping and bidirectional attention refused."""
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(name) is not None:
            raise ConfigError(f"{name}={cfg[name]} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported")
    if cfg.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported for gemma3_text")
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0 else "sliding"
        for i in range(n)
    ]
    window = int(cfg.get("sliding_window") or 0)
    params = cfg.get("rope_parameters") or {}
    full = params.get("full_attention") if "full_attention" in params else params
    theta, rope = _rope_fields(full, cfg.get("rope_theta", 1_000_000.0))
    local = params.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise ConfigError("scaled RoPE on sliding-window layers is not supported")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {
        "rope_theta": theta,
        "rope_scaling": rope,
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "norm": "rms_offset",
        "sandwich_norm": True,
        "qk_norm": True,
        "embed_scale": float(cfg["hidden_size"]) ** 0.5,
        "attn_scale": float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        "layer_windows": tuple(0 if t == "full_attention" else window for t in types),
        "local_rope_theta": float(
            local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        ),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


@dataclass(frozen=True)
class RecursionConfig:
    """How the unrolled depth L is folded: a block of K shared layers run ``loops`` times,
    with a per-position LoRA delta of ``ranks[module]`` on every linear map.

    The layout: the paper's full cycle shares all L layers (``prefix_layers`` =
    ``suffix_layers`` = 0). Middle-cycle keeps the first ``prefix_layers`` and the last
    ``suffix_layers`` original layers unique (their own dense weights, run once per token:
    before loop 0, and on the hidden state where the token exits) and folds the L − P − E
    middle layers into the block. A config without the fields (older checkpoints) is full cycle.
    """

    loops: int = 1
    init: str = "lower"
    ranks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINEAR_MODULES, 0))
    prefix_layers: int = 0
    suffix_layers: int = 0

    def __post_init__(self) -> None:
        if self.loops < 1:
            raise ConfigError(f"loops must be >= 1, got {self.loops}")
        for name in ("prefix_layers", "suffix_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init={self.init!r} is not one of {', '.join(INIT_METHODS)}")
        ranks = {m: int(self.ranks.get(m, 0)) for m in LINEAR_MODULES}
        unknown = set(self.ranks) - set(LINEAR_MODULES)
        if unknown:
            raise ConfigError(f"unknown LoRA module(s) {sorted(unknown)}")
        if any(r < 0 for r in ranks.values()):
            raise ConfigError(f"LoRA ranks must be >= 0, got {ranks}")
        object.__setattr__(self, "ranks", ranks)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture + recursion; ``block_layers`` (K, the shared block's layers) =
    (L − P − E) / loops, P and E the unique first and last layers of a middle-cycle layout."""

    arch: ArchConfig
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    exit_thresholds: dict[str, list[float]] | None = None
    exit_heads: bool = False  # learned exit heads (``model.exit_heads``) beside the weights

    def __post_init__(self) -> None:
        loops, unique = self.recursion.loops, self.prefix_layers + self.suffix_layers
        if unique >= self.arch.num_layers:
            raise ConfigError(
                f"prefix_layers={self.prefix_layers} + suffix_layers={self.suffix_layers} "
                f"leave none of the {self.arch.num_layers} layers to share"
            )
        n = self.shared_layers
        if n % loops:
            divisors = [b for b in range(1, n + 1) if n % b == 0]
            what = f"num_hidden_layers={n} is" if not unique else f"{n} shared layers are"
            folded = "(L − P − E)" if unique else "L"
            raise ConfigError(
                f"{what} not divisible by loops={loops}: every loop runs the same K = {folded} "
                f"/ B layers (loops that divide {n}: {divisors})"
            )
        absent = set(LINEAR_MODULES) - set(self.arch.linear_modules)
        if any(self.recursion.ranks[m] for m in absent):  # e.g. `--rank 64` on an ungated MLP
            ranks = {m: 0 if m in absent else r for m, r in self.recursion.ranks.items()}
            object.__setattr__(self, "recursion", replace(self.recursion, ranks=ranks))
        for m, r in self.recursion.ranks.items():
            if r > self.full_rank(m):
                raise ConfigError(
                    f"rank {r} for module {m!r} exceeds its full rank {self.full_rank(m)}"
                )

    @property
    def loops(self) -> int:
        return self.recursion.loops

    @property
    def prefix_layers(self) -> int:
        """P: the unique first layers (middle-cycle; 0 in the full cycle)."""
        return self.recursion.prefix_layers

    @property
    def suffix_layers(self) -> int:
        """E: the unique last layers (middle-cycle; 0 in the full cycle)."""
        return self.recursion.suffix_layers

    @property
    def shared_layers(self) -> int:
        """K · B: the unrolled positions of the block, original layers P .. L − E − 1."""
        return self.arch.num_layers - self.prefix_layers - self.suffix_layers

    @property
    def block_layers(self) -> int:
        return self.shared_layers // self.recursion.loops

    @property
    def is_vanilla(self) -> bool:
        """One stack of L plain layers: what conversion folds."""
        return (
            self.loops == 1
            and not any(self.recursion.ranks.values())
            and self.prefix_layers == self.suffix_layers == 0
        )

    def full_rank(self, module: str) -> int:
        return min(self.arch.linear_shape(module))

    def with_recursion(self, recursion: RecursionConfig) -> ModelConfig:
        return replace(self, recursion=recursion)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"]["eos_token_id"] = list(self.arch.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            arch_d = dict(d["arch"])
            rs = arch_d.pop("rope_scaling", None)
            arch_d["eos_token_id"] = tuple(arch_d.get("eos_token_id") or ())
            arch = ArchConfig(**arch_d, rope_scaling=RopeScaling(**rs) if rs else None)
            recursion = RecursionConfig(**d.get("recursion", {}))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed loopserve config: {e}") from e
        return cls(
            arch=arch,
            recursion=recursion,
            exit_thresholds=d.get("exit_thresholds"),
            exit_heads=bool(d.get("exit_heads", False)),
        )
