"""Malformed or unsupported checkpoints fail with a message naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from loopserve.cli import main
from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import LINEAR_MODULES, ConfigError
from model.convert import convert


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"num_attention_heads": 5}, "num_attention_heads=5"),
        ({"vocab_size": None}, "'vocab_size' is missing"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn'"),
    ],
)
def test_unsupported_config_names_the_field(
    tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM], changes: dict, message: str
) -> None:
    d = _copy(tiny_hf[0], tmp_path / "m")
    if "rope_scaling" in changes:
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        (d / "config.json").write_text(json.dumps(cfg))
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_model(d)


def test_missing_and_misshapen_tensors(
    tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM]
) -> None:
    d = _copy(tiny_hf[0], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\.mlp\.up_proj"):
        load_model(d)
    tensors["model.layers.3.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"has shape \(3, 3\), expected \(80, 48\)"):
        load_model(d)


def test_unreadable_files(tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    d = _copy(tiny_hf[0], tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\.bin weights"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(d)


def test_malformed_loopserve_checkpoint(
    tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM]
) -> None:
    model, _ = convert(load_model(tiny_hf[0]), 2, "average", {"q": 4}, progress=False)
    d = save_checkpoint(model, tmp_path / "rrt")
    meta = json.loads((d / "loopserve.json").read_text())
    meta["config"]["recursion"]["loops"] = 4
    (d / "loopserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not divisible by loops=4"):
        load_model(d)
    meta["config"]["recursion"]["loops"] = 3
    (d / "loopserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"'input_norm' has shape \(3, 2, 48\), expected"):
        load_model(d)
    meta["config"]["recursion"]["loops"] = 2
    meta["config"]["recursion"]["ranks"] = {"q": 4, "k": 2}
    (d / "loopserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing \['lora_a\.k', 'lora_b\.k'\]"):
        load_model(d)
    meta["config"]["recursion"]["ranks"] = {"qq": 4}
    (d / "loopserve.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown LoRA module"):
        load_model(d)
    (d / "loopserve.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a loopserve checkpoint"):
        load_model(d)


def test_bad_loops_are_a_config_error(tiny_hf: tuple[Path, LlamaForCausalLM]) -> None:
    with pytest.raises(ConfigError, match="not divisible by loops=4"):
        convert(load_model(tiny_hf[0]), 4, "average", {}, progress=False)
    with pytest.raises(ConfigError, match="init='middle'"):
        convert(load_model(tiny_hf[0]), 2, "middle", {}, progress=False)


def test_cli_reports_errors_without_traceback(
    tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM], capsys: pytest.CaptureFixture[str]
) -> None:
    d = _copy(tiny_hf[0], tmp_path / "m")
    _edit_config(d, model_type="mamba")
    rc = main(["convert", str(d), "--loops", "2", "--out", str(tmp_path / "o"), "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "loopserve convert: error:" in err and "model_type='mamba'" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["convert", str(d), "--loops", "2", "--rank", "-3", "--out", "x"])
    assert "rank must be >= 0" in capsys.readouterr().err


def test_cli_convert_writes_checkpoint_and_report(
    tmp_path: Path, tiny_hf: tuple[Path, LlamaForCausalLM], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rrt"
    rc = main(
        [
            "convert",
            str(tiny_hf[0]),
            "--loops",
            "3",
            "--init",
            "stepwise",
            "--rank",
            "4",
            "--rank-mlp",
            "full",
            "--out",
            str(out),
            "--no-eval",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "parameters: original" in printed and "saved" in printed
    model = load_model(out)
    assert model.config.recursion.ranks == {
        "q": 4,
        "k": 4,
        "v": 4,
        "o": 4,
        "gate": 48,
        "up": 48,
        "down": 48,
    }
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["report"]["energy_kept"]) == set(LINEAR_MODULES)
    meta = json.loads((out / "loopserve.json").read_text())
    assert meta["provenance"]["init"] == "stepwise"
    assert meta["provenance"]["energy_kept"]["gate"] == pytest.approx(1.0)
