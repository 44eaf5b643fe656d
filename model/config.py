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
SUPPORTED_ARCHITECTURES: dict[str, bool] = {"llama": False, "qwen2": True}  # model_type -> bias


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
    """The dense architecture. ``num_layers`` is the unrolled depth (L = K * B)."""

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
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported")
        if cfg.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if not isinstance(cfg.get(name), int):
                raise ConfigError(f"config field {name!r} is missing or not an integer")
        num_heads = cfg.get("num_attention_heads")
        if not isinstance(num_heads, int):
            raise ConfigError("config field 'num_attention_heads' is missing or not an integer")
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        rope = None
        if isinstance(scaling, dict):
            rope_theta = scaling.get("rope_theta", rope_theta)
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype != "default":
                rope = RopeScaling(
                    rope_type=rtype,
                    factor=float(scaling.get("factor", 1.0)),
                    low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        scaling.get("original_max_position_embeddings", 8192)
                    ),
                )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        bias = SUPPORTED_ARCHITECTURES[model_type] or bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or 0,
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_ids,
            model_type=model_type,
        )


@dataclass(frozen=True)
class RecursionConfig:
    """How the unrolled depth L is folded: a block of K shared layers run ``loops`` times,
    with a per-position LoRA delta of ``ranks[module]`` on every linear map."""

    loops: int = 1
    init: str = "lower"
    ranks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINEAR_MODULES, 0))

    def __post_init__(self) -> None:
        if self.loops < 1:
            raise ConfigError(f"loops must be >= 1, got {self.loops}")
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
    """Architecture + recursion; ``block_layers`` (K, the shared block's layers) = L / loops."""

    arch: ArchConfig
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    exit_thresholds: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if self.arch.num_layers % self.recursion.loops:
            raise ConfigError(
                f"num_hidden_layers={self.arch.num_layers} is not divisible by "
                f"loops={self.recursion.loops}"
            )
        for m, r in self.recursion.ranks.items():
            if r > self.full_rank(m):
                raise ConfigError(
                    f"rank {r} for module {m!r} exceeds its full rank {self.full_rank(m)}"
                )

    @property
    def loops(self) -> int:
        return self.recursion.loops

    @property
    def block_layers(self) -> int:
        return self.arch.num_layers // self.recursion.loops

    @property
    def is_vanilla(self) -> bool:
        return self.loops == 1 and not any(self.recursion.ranks.values())

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
        return cls(arch=arch, recursion=recursion, exit_thresholds=d.get("exit_thresholds"))
