"""Engine configuration: frozen, validated once, composed by the server from its settings."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.exit_policy import EXIT_MEASURES, EXITS_OFF

BATCHING_MODES: tuple[str, ...] = ("depth", "sequence")
KV_FILL_MODES: tuple[str, ...] = ("propagate", "copy")
DEPTH_ALIGNMENTS: tuple[str, ...] = ("auto", "mixed", "aligned")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, exits and spends KV memory.

    ``batching="depth"`` runs one loop of the block per step for rows at mixed depths;
    ``"sequence"`` runs all loops per step (vLLM/Orca-style iteration-level batching), the
    baseline. ``exit_threshold`` > 1 disables early exit unless a request asks for it;
    ``exit_thresholds`` (per depth, from calibration) replace it where given. ``exit_measure``
    ``"gate"`` (a checkpoint with learned exit heads) decides exits before the LM head.

    ``depth_alignment`` (depth mode): ``"mixed"`` runs every in-flight item each step, whatever
    its depth; ``"aligned"`` runs the depth most items are at and holds the others (at most
    ``loops - 1`` steps), so rows fall into step, and a step that starts at loop 0 with no item
    able to exit early runs every loop at once; ``"auto"`` aligns when the model serves some
    module as dense per-depth weights, where each extra depth in a step is another full weight
    read, and mixes when the depths share one weight plus small deltas.
    """

    batching: str = "depth"
    depth_alignment: str = "auto"
    exit_threshold: float = EXITS_OFF
    exit_thresholds: tuple[float, ...] = ()
    exit_measure: str = "prob"
    min_loops: int = 1
    kv_fill: str = "propagate"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int = 1024
    max_model_len: int = 2048
    enable_prefix_caching: bool = False
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids beside the model config's (e.g. from generation_config.json)."""
    forced_exit_weights: tuple[float, ...] = ()
    """Benchmark mode, never a serving default: each token's exit depth is drawn from these
    per-depth weights, deterministically from (request, position), instead of by confidence —
    so batching can be timed under a known exit schedule, whatever the exits' quality."""
    compile_block: bool = False
    """Run the block pass compiled (torch.compile / inductor, ``model.compiled_block``), rows
    padded to ``compile_buckets``: fewer, fused ops where the step is launch-bound (a GPU).
    Off by default: on the CPU the one-call C++ decode layer is already one call per layer."""
    compile_buckets: tuple[int, ...] = ()
    """Row counts the compiled pass pads to, ascending; a pass above the largest runs eager.
    Empty: 1, 2, 4, ..., 256, then multiples of 256, up to ``max_num_batched_tokens``."""

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.depth_alignment not in DEPTH_ALIGNMENTS:
            raise ValueError(
                f"depth_alignment must be one of {DEPTH_ALIGNMENTS}, got {self.depth_alignment!r}"
            )
        if self.kv_fill not in KV_FILL_MODES:
            raise ValueError(f"kv_fill must be one of {KV_FILL_MODES}, got {self.kv_fill!r}")
        if self.exit_measure not in EXIT_MEASURES:
            raise ValueError(f"exit_measure must be one of {EXIT_MEASURES}")
        if self.exit_threshold < 0 or any(t < 0 for t in self.exit_thresholds):
            raise ValueError(
                f"exit thresholds must be >= 0, got {self.exit_threshold}, {self.exit_thresholds}"
            )
        for name in ("min_loops", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.forced_exit_weights and (
            min(self.forced_exit_weights) < 0 or sum(self.forced_exit_weights) <= 0
        ):
            raise ValueError(
                f"forced_exit_weights must be >= 0, not all 0: {self.forced_exit_weights}"
            )
        buckets = self.compile_buckets
        if buckets and (min(buckets) < 1 or list(buckets) != sorted(set(buckets))):
            raise ValueError(f"compile_buckets must be ascending and >= 1, got {buckets}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def thresholds_for(self, loops: int) -> tuple[float, ...]:
        """The exit threshold at each depth: the calibrated ones where given (a depth they do
        not cover never exits), else ``exit_threshold`` everywhere."""
        if not self.exit_thresholds:
            return (self.exit_threshold,) * loops
        given = self.exit_thresholds[:loops]
        return given + (EXITS_OFF,) * (loops - len(given))
