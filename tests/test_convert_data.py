"""Calibration and held-out data for conversion, and ``loopserve convert`` end to end.

The evaluation must never see calibration data: the shipped prompt sets are disjoint from
each other, from the uptraining prompts and from the built-in evaluation text. Self-distilled
samples come from a batched, cached sampler that agrees with the greedy oracle.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config, write_hf_model
from server_support import write_tiny_tokenizer
from transformers import AutoTokenizer

import model.calibration_data as cd
from loopserve.cli import main
from model.checkpoint import load_model
from model.fidelity import eval_text
from model.generate import greedy_generate, sample_continuations

torch.set_num_threads(1)


def test_prompt_sets_are_disjoint_from_each_other_and_every_evaluation_text() -> None:
    calib = cd.builtin_prompts(cd.CALIBRATION_PROMPTS)
    held = cd.builtin_prompts(cd.HELDOUT_PROMPTS)
    training = resources.files("training").joinpath("data/prompts.txt").read_text()
    train = {line.strip() for line in training.splitlines() if line.strip()}
    assert len(calib) >= 50 and len(held) >= 50
    assert not set(calib) & set(held)
    assert not (set(calib) | set(held)) & train
    text = eval_text()
    assert not [p for p in calib + held if p in text]


def test_batched_sampler_at_low_temperature_is_greedy(tiny_hf: tuple[Path, object]) -> None:
    model = load_model(tiny_hf[0])
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12]]  # ragged: left padding must not leak
    gen = torch.Generator().manual_seed(0)
    got = sample_continuations(model, prompts, 10, gen, temperature=1e-6, top_p=1.0)
    assert got == [greedy_generate(model, p, 10) for p in prompts]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_with_tokenizer")
    write_hf_model(d, tiny_llama_config())
    write_tiny_tokenizer(d)
    return d


def test_self_distilled_samples_are_cached_and_disjoint_from_held_out(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_model(tiny_src)
    tok = AutoTokenizer.from_pretrained(str(tiny_src))
    calib = cd.self_distilled(source, tiny_src, tok, cd.CALIBRATION_PROMPTS, 600, 0, tmp_path)
    assert sum(map(len, calib)) >= 600 - len(calib)
    held = cd.self_distilled(source, tiny_src, tok, cd.HELDOUT_PROMPTS, 600, 1000, tmp_path)
    assert not {tuple(s) for s in calib} & {tuple(s) for s in held}

    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("a cached set was generated again")

    monkeypatch.setattr(cd, "sample_continuations", refuse)
    again = cd.self_distilled(source, tiny_src, tok, cd.CALIBRATION_PROMPTS, 600, 0, tmp_path)
    assert again == calib


def test_convert_cli_calibrates_and_reports_both_evaluation_sets(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LOOPSERVE_HOME", str(tmp_path / "home"))
    out, report = tmp_path / "rrt", tmp_path / "report.json"
    argv = ["convert", str(tiny_src), "--loops", "3", "--rank", "4", "--rank-at", "0=full"]
    argv += ["--self-distill", "512", "--out", str(out), "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "deltas=sequential" in printed and "fidelity (held-out samples):" in printed
    data = json.loads(report.read_text())
    assert data["fidelity_heldout"]["tokens"] >= 4096
    assert data["report"]["calibration_tokens"] >= 256
    assert data["report"]["position_ranks"]["q"][0] == 48
    meta = json.loads((out / "loopserve.json").read_text())["provenance"]
    assert meta["method"] == "sequential" and meta["fidelity_heldout"] is not None
    model = load_model(out)
    assert model.config.recursion.ranks["q"] == 48
