"""Server pieces without a live server: sizes, settings from the environment, the exit
rule, KV sizing, and the ``serve`` command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import huggingface_hub.constants
import pytest
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from loopserve.cli import build_parser, main
from model.checkpoint import load_model
from model.config import ArchConfig, ModelConfig, RecursionConfig
from model.convert import convert
from model.serving import materialise_high_rank
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.exit_policy import EXITS_OFF
from server.loader import batching_label, engine_config, exit_rule, model_info, resolve_model_dir
from server.settings import ServeConfigError, ServeSettings, parse_size

ARCH = ArchConfig(
    vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=6, num_heads=2, num_kv_heads=1
)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("2G", 2 * 10**9), ("1.5gib", 3 * 2**29), ("4096", 4096), (7, 7)],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1", "0", "5 parsecs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_settings_from_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSERVE_PORT", "9001")
    monkeypatch.setenv("LOOPSERVE_KV_CACHE_MEMORY", "1GiB")
    monkeypatch.setenv("LOOPSERVE_BATCHING", "sequence")
    monkeypatch.setenv("LOOPSERVE_API_KEY", "k")
    s = ServeSettings(port=9002)  # a flag wins over the environment
    assert (s.port, s.kv_cache_memory, s.batching, s.api_key) == (9002, 2**30, "sequence", "k")
    monkeypatch.setenv("LOOPSERVE_BATCHING", "sideways")
    with pytest.raises(ValidationError, match="batching"):
        ServeSettings()
    monkeypatch.setenv("LOOPSERVE_BATCHING", "depth")
    monkeypatch.setenv("LOOPSERVE_DEPTH_ALIGNMENT", "sometimes")
    with pytest.raises(ValidationError, match="depth_alignment"):
        ServeSettings()


def test_exit_rule_off_unless_calibrated_or_asked() -> None:
    plain = ModelConfig(ARCH, RecursionConfig(loops=3))
    off = exit_rule(plain, ServeSettings())
    assert (off.threshold, off.thresholds) == (EXITS_OFF, ())
    calibrated = ModelConfig(
        ARCH, RecursionConfig(loops=3), {"margin": [0.5, 0.4], "prob": [1.01, 0.9]}
    )
    rule = exit_rule(calibrated, ServeSettings())
    assert (rule.thresholds, rule.measure, rule.min_loops) == ((1.01, 0.9), "prob", 1)
    asked = exit_rule(calibrated, ServeSettings(exit_threshold=0.8, min_loops=2))
    assert (asked.threshold, asked.thresholds, asked.min_loops) == (0.8, (), 2)
    margin = exit_rule(calibrated, ServeSettings(exit_measure="margin"))
    assert (margin.thresholds, margin.measure) == ((0.5, 0.4), "margin")


def test_exit_measure_needs_its_calibration_and_the_gate_its_heads() -> None:
    calibrated = ModelConfig(ARCH, RecursionConfig(loops=3), {"prob": [0.9, 0.9]})
    with pytest.raises(ServeConfigError, match="no calibrated thresholds for --exit-measure"):
        exit_rule(calibrated, ServeSettings(exit_measure="margin"))
    with pytest.raises(ServeConfigError, match="needs learned exit heads"):
        exit_rule(calibrated, ServeSettings(exit_measure="gate"))
    gated = dataclasses.replace(
        calibrated, exit_thresholds={"prob": [0.9, 0.9], "gate": [0.7, 0.6]}, exit_heads=True
    )
    rule = exit_rule(gated, ServeSettings(exit_measure="gate"))
    assert (rule.thresholds, rule.measure) == ((0.7, 0.6), "gate")


def test_kv_memory_must_hold_one_full_sequence(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    model = load_model(tiny_hf[0])
    cfg = engine_config(model, ServeSettings(kv_cache_memory="1MiB", block_size=4), model.dtype)
    assert cfg.num_blocks == 2**20 // (2 * 4 * 2 * 12 * 4 * 6) and cfg.max_model_len == 128
    assert cfg.depth_alignment == "auto"
    mixed = ServeSettings(kv_cache_memory="1MiB", depth_alignment="mixed")
    assert engine_config(model, mixed, model.dtype).depth_alignment == "mixed"
    with pytest.raises(ServeConfigError, match="kv-cache-memory"):
        engine_config(model, ServeSettings(kv_cache_memory="4KiB"), model.dtype)


def test_serve_lists_every_option() -> None:
    help_text = (
        build_parser(["serve"])[0]._subparsers._group_actions[0].choices["serve"].format_help()
    )
    for flag in (
        "--model", "--host", "--port", "--api-key", "--served-model-name", "--batching",
        "--depth-alignment",
        "--exit-threshold", "--min-loops", "--kv-fill", "--max-num-seqs",
        "--max-num-batched-tokens", "--kv-cache-memory", "--max-model-len", "--max-queue",
        "--dtype", "--header-timeout", "--body-timeout",
    ):  # fmt: skip
        assert flag in help_text


def test_serve_reports_bad_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--kv-cache-memory", "lots"]) == 2
    assert "kv_cache_memory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2  # vLLM's positional MODEL
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "a", "--model", "b"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_org_name_resolves_from_the_local_hf_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache layout huggingface_hub reads: refs/main names the snapshot."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_dir("org/tiny") == snapshot
    with pytest.raises(ServeConfigError, match="local Hugging Face cache"):
        resolve_model_dir("org/absent")


def test_calibrated_thresholds_reach_the_engine_per_depth(
    tiny_hf: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    model, _ = convert(load_model(tiny_hf[0]), 3, "average", {"q": 4}, progress=False)
    model.config = dataclasses.replace(model.config, exit_thresholds={"prob": [1.01, 0.9]})
    cfg = engine_config(model, ServeSettings(kv_cache_memory="1MiB", block_size=4), model.dtype)
    assert cfg.thresholds_for(3) == (1.01, 0.9, EXITS_OFF)
    info = model_info(model, tmp_path, cfg, "tiny")
    assert info.exit_thresholds == [1.01, 0.9] and info.exit_measure == "prob"
    flat = engine_config(
        model, ServeSettings(kv_cache_memory="1MiB", block_size=4, exit_threshold=2.0), model.dtype
    )
    assert model_info(model, tmp_path, flat, "tiny").exit_thresholds is None


def test_startup_log_names_the_resolved_batching(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    cfg = EngineConfig(block_size=4, num_blocks=64, max_model_len=32)
    lora, _ = convert(load_model(tiny_hf[0]), 3, "average", {"q": 4}, progress=False)
    assert batching_label(Engine(lora, cfg)) == "depth-wise (mixed depths)"
    seq = dataclasses.replace(cfg, batching="sequence")
    assert batching_label(Engine(lora, seq)) == "sequence-wise"
    materialise_high_rank(lora, force=True)
    assert batching_label(Engine(lora, cfg)) == "depth-wise (aligned)"
