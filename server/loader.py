"""From settings to a running engine: load the model and tokenizer, size the KV cache, pick
the exit rule, and describe the model for ``/v1/models``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.checkpoint import LOOPSERVE_CONFIG, load_model, read_loopserve_meta
from model.config import ModelConfig
from model.recursive import RecursiveLM
from model.serving import prepare_for_serving
from scheduler.async_engine import AsyncEngine
from scheduler.config import EXITS_OFF, EngineConfig
from scheduler.engine import Engine
from scheduler.kv_cache import KVCache
from server.params import DEFAULTABLE
from server.settings import DEFAULT_MODEL, ServeConfigError, ServeSettings

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` tells users about the served model, and the limits routes check."""

    name: str
    path: str
    loops: int
    ranks: dict[str, int]
    parameters: int
    source_parameters: int | None
    fidelity: dict[str, Any] | None
    max_model_len: int
    vocab_size: int
    exit_thresholds: list[float] | None  # per depth; None: early exit off
    exit_measure: str
    min_loops: int
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # generation_config.json


@dataclass(frozen=True)
class ExitRule:
    threshold: float
    thresholds: tuple[float, ...]  # calibrated, per depth; empty: ``threshold`` everywhere
    measure: str
    min_loops: int


def exit_rule(config: ModelConfig, settings: ServeSettings) -> ExitRule:
    """Early exit is on only where a flag asks or the checkpoint carries calibrated thresholds.

    Calibrated thresholds apply per depth, as they were fitted (a depth calibrated at > 1 never
    exits), for ``--exit-measure`` (default: prob where calibrated); ``--exit-threshold``
    replaces them with one threshold for every depth. The gate needs learned exit heads.
    """
    calibrated = config.exit_thresholds or {}
    measure = settings.exit_measure
    if measure == "gate" and not config.exit_heads:
        raise ServeConfigError(
            "--exit-measure gate needs learned exit heads: run `loopserve calibrate "
            "--exit-heads` on the checkpoint first"
        )
    if measure is None:
        measure = "prob" if "prob" in calibrated or not calibrated else next(iter(calibrated))
    thresholds: tuple[float, ...] = ()
    if settings.exit_threshold is None and calibrated:
        if measure not in calibrated:
            raise ServeConfigError(
                f"the checkpoint has no calibrated thresholds for --exit-measure {measure} "
                f"(it has {sorted(calibrated)}); give --exit-threshold or recalibrate"
            )
        thresholds = tuple(float(t) for t in calibrated[measure])
    threshold = EXITS_OFF if settings.exit_threshold is None else settings.exit_threshold
    min_loops = 1 if settings.min_loops is None else settings.min_loops
    return ExitRule(threshold, thresholds, measure, min_loops)


def resolve_model_dir(spec: str) -> Path:
    """A model directory, building the default model first when asked for ``default``; an
    ``org/name`` that is no directory here is looked up in the local Hugging Face cache (never
    the network: nothing is downloaded)."""
    if spec != DEFAULT_MODEL:
        path = Path(spec)
        if path.exists() or spec.count("/") != 1 or spec.startswith(("/", ".")):
            return path
        return _from_hf_cache(spec)
    from model.default import default_model_dir, ensure_default_model

    if not (default_model_dir() / LOOPSERVE_CONFIG).exists():
        log.info("building the default model (first run: import and convert, a few minutes)")
    return ensure_default_model()


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise ServeConfigError(
            f"{repo_id!r} is neither a directory nor in the local Hugging Face cache (loopserve "
            f"never downloads models): {e}"
        ) from e


@dataclass(frozen=True)
class GenerationConfig:
    """What a model directory's ``generation_config.json`` says about decoding: EOS ids beside
    config.json's, and the sampling defaults requests that leave a field out get (as vLLM's
    ``--generation-config auto``)."""

    eos_token_ids: tuple[int, ...] = ()
    defaults: dict[str, float] = field(default_factory=dict)


def read_generation_config(model_dir: Path, use: bool = True) -> GenerationConfig:
    path = model_dir / "generation_config.json"
    if not use or not path.exists():
        return GenerationConfig()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ServeConfigError(f"cannot read {path}: {e}") from e
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(t, int) and t >= 0 for t in eos_ids):
        raise ServeConfigError(f"{path}: eos_token_id must be token ids, got {eos!r}")
    defaults = {}
    if cfg.get("do_sample") is not False:  # do_sample false: its sampling fields are unused
        for name in DEFAULTABLE:
            value = cfg.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                defaults[name] = float(value)
    return GenerationConfig(eos_ids, defaults)


def load_tokenizer(model_dir: Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer; ``chat_template`` (a file, or the Jinja text itself, as vLLM's
    ``--chat-template``) replaces the template it ships with."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ServeConfigError(f"cannot load a tokenizer from {model_dir}: {e}") from e
    if chat_template is not None:
        path = Path(chat_template)
        if path.is_file():
            tokenizer.chat_template = path.read_text()
        elif "{" in chat_template:
            tokenizer.chat_template = chat_template
        else:
            raise ServeConfigError(f"--chat-template: no such file {chat_template!r}")
    return tokenizer


def engine_config(
    model: RecursiveLM,
    settings: ServeSettings,
    dtype: torch.dtype,
    eos_token_ids: tuple[int, ...] = (),
) -> EngineConfig:
    """Engine limits from the settings; the KV pool is as many blocks as the memory holds."""
    per_block = KVCache.bytes_per_block(model.config, settings.block_size, dtype)
    num_blocks = settings.kv_cache_memory // per_block
    max_len = settings.max_model_len or model.config.arch.max_position_embeddings
    need = model.config.loops * -(-max_len // settings.block_size)
    if num_blocks < need:
        raise ServeConfigError(
            f"kv_cache_memory={settings.kv_cache_memory} bytes holds {num_blocks} blocks of "
            f"{per_block} bytes; one {max_len}-token sequence over {model.config.loops} loops "
            f"needs {need}: raise --kv-cache-memory or lower --max-model-len"
        )
    rule = exit_rule(model.config, settings)
    return EngineConfig(
        batching=settings.batching,
        depth_alignment=settings.depth_alignment,
        exit_threshold=rule.threshold,
        exit_thresholds=rule.thresholds,
        exit_measure=rule.measure,
        min_loops=rule.min_loops,
        kv_fill=settings.kv_fill,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        block_size=settings.block_size,
        num_blocks=num_blocks,
        max_model_len=max_len,
        eos_token_ids=eos_token_ids,
        enable_prefix_caching=settings.enable_prefix_caching,
        compile_block=settings.compile,
    )


def _active_thresholds(config: EngineConfig, loops: int) -> list[float] | None:
    """Per-depth thresholds of the depths that can exit, or None when none can."""
    per_depth = list(config.thresholds_for(loops)[: loops - 1])
    return per_depth if any(t <= 1.0 for t in per_depth) else None


def model_info(
    model: RecursiveLM,
    model_dir: Path,
    config: EngineConfig,
    name: str,
    sampling_defaults: dict[str, float] | None = None,
) -> ModelInfo:
    provenance: dict[str, Any] = {}
    if (model_dir / LOOPSERVE_CONFIG).exists():
        provenance = read_loopserve_meta(model_dir).get("provenance") or {}
    params = provenance.get("parameters") or {}
    return ModelInfo(
        name=name,
        path=str(model_dir.resolve()),
        loops=model.config.loops,
        ranks=dict(provenance.get("ranks") or model.config.recursion.ranks),
        parameters=model.checkpoint_parameters,
        source_parameters=params.get("source"),
        fidelity=provenance.get("fidelity"),
        max_model_len=config.max_model_len,
        vocab_size=model.config.arch.vocab_size,
        exit_thresholds=_active_thresholds(config, model.config.loops),
        exit_measure=config.exit_measure,
        min_loops=config.min_loops,
        sampling_defaults=dict(sampling_defaults or {}),
    )


def build_engine(
    settings: ServeSettings,
) -> tuple[AsyncEngine, PreTrainedTokenizerBase, ModelInfo]:
    """Load everything ``serve`` needs; the engine thread starts stepping at once.

    The model is loaded on the engine thread (see ``AsyncEngine``); this thread only reads
    files and metadata.
    """
    model_dir = resolve_model_dir(settings.model)
    front = AsyncEngine(lambda: load_engine(settings, model_dir), max_queue=settings.max_queue)
    engine = front.engine
    tokenizer = engine.tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    name = settings.served_model_name or model_dir.resolve().name
    defaults = read_generation_config(model_dir, settings.generation_config == "auto").defaults
    info = model_info(engine.model, model_dir, engine.config, name, defaults)
    log.info(
        "serving %s (%s): %d loops, %d parameters, %s batching, %d KV blocks of %d tokens, "
        "max_model_len %d, early exit %s",
        name,
        info.path,
        info.loops,
        info.parameters,
        batching_label(engine),
        engine.config.num_blocks,
        engine.config.block_size,
        engine.config.max_model_len,
        "off"
        if info.exit_thresholds is None
        else f"at {info.exit_measure} >= {info.exit_thresholds} per depth",
    )
    return front, tokenizer, info


def batching_label(engine: Engine) -> str:
    """How steps are formed, as the startup log says it: what ``auto`` resolved to."""
    if engine.sequence_mode:
        return "sequence-wise"
    return "depth-wise (aligned)" if engine.scheduler.aligned else "depth-wise (mixed depths)"


def load_engine(settings: ServeSettings, model_dir: Path) -> Engine:
    """Model, dense high-rank deltas, tokenizer and engine limits; runs on the engine thread."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    dtype = DTYPES[settings.dtype]
    model = load_model(model_dir, dtype=dtype, device=settings.device, keep_full_precision=True)
    plan = prepare_for_serving(model, compiled=settings.compile)
    if plan.dense:
        log.info("high-rank deltas served as per-position dense weights: %s", ", ".join(plan.dense))
    log.info("fused projections: %s", ", ".join("|".join(g) for g in plan.fused) or "none")
    log.info(
        "weights packed for oneDNN: %s",
        ", ".join("|".join(g) for g in plan.packed) or "none (needs bfloat16 on a bf16 CPU)",
    )
    tokenizer = load_tokenizer(model_dir, settings.chat_template)
    generation = read_generation_config(model_dir, settings.generation_config == "auto")
    try:
        config = engine_config(model, settings, dtype, generation.eos_token_ids)
    except ValueError as e:
        raise ServeConfigError(str(e)) from e
    return Engine(model, config, tokenizer, seed=settings.seed)
