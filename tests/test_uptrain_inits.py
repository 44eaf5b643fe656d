"""The uptraining-from-each-init benchmark on a tiny random model, two steps per init.

Both curves must share their evaluation points and token counts (one budget), and step 0 of
each must be its conversion's own fidelity report, measured by ``loopserve convert``'s code
before any training. ``loopserve uptrain`` runs in this process (the benchmark's command line,
given to ``training.cli.main``): a fresh interpreter per run would cost more than the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_llama_config, write_hf_model
from server_support import write_tiny_tokenizer

import benchmarks.uptrain_inits as bench
from training.cli import main as training_main


def _in_process(argv: list[str], env: dict[str, str]) -> None:
    assert argv[1:3] == ["-m", "training.cli"] and env["OMP_NUM_THREADS"] == "1"
    assert training_main(argv[3:]) == 0


def test_two_curves_on_one_budget_start_at_the_conversion_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPSERVE_HOME", str(tmp_path / "home"))  # the self-distilled caches
    monkeypatch.setattr(bench, "launch", _in_process)
    src, out = tmp_path / "src", tmp_path / "out"
    write_hf_model(src, tiny_llama_config())
    write_tiny_tokenizer(src)
    argv = ["--source", str(src), "--work", str(tmp_path / "work"), "--out", str(out)]
    argv += ["--rank", "4", "--calibration-tokens", "512", "--train-tokens", "600"]
    argv += ["--gen-len", "16", "--gen-batch", "4", "--seq-len", "128", "--steps", "2"]
    argv += ["--batch-size", "2", "--warmup", "1", "--exit-warmup", "2", "--eval-every", "1"]
    assert bench.main([*argv, "--threads", "1", "--no-progress"]) == 0

    record = json.loads((out / "uptrain_inits.json").read_text())
    runs = record["runs"]
    assert list(runs) == ["plain", "sequential"]
    curves = {m: run["curve"] for m, run in runs.items()}
    for curve in curves.values():
        assert [r["step"] for r in curve] == [0, 1, 2]
        assert [r["tokens_seen"] for r in curve] == [0, 2 * 128, 4 * 128]
    assert record["common_steps"] == [0, 1, 2]
    for method, run in runs.items():
        start = run["curve"][0]
        report = json.loads((tmp_path / "work" / f"{method}_b3_r4" / "loopserve.json").read_text())
        for key, name in (("fidelity", "builtin"), ("fidelity_heldout", "heldout")):
            want = report["provenance"][key]
            assert want == run["conversion"][name]
            assert start[key]["tokens"] == want["tokens"]
            assert start[key]["agreement"] == want["agreement"]
            for field in ("kl", "converted_ppl", "source_ppl"):
                assert start[key][field] == pytest.approx(want[field], rel=1e-5)
        assert run["summary"]["step"] == 2 and not run["summary"]["stopped_early"]
        assert run["train_windows"] == runs["plain"]["train_windows"]  # one shared data set
    plain, sequential = (runs[m]["curve"][0]["fidelity"]["kl"] for m in runs)
    assert sequential < plain  # two different inits, not one measured twice
    assert set(record["below_everywhere"]) == {"builtin", "heldout"}
    assert record["machine"] and record["commit"] and record["budget"]["steps"] == 2
    assert "| 2 | 512 |" in (out / "uptrain_inits.md").read_text()
    assert (out / "uptrain_inits.png").stat().st_size > 0
