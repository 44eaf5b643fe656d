"""The exit-targets benchmark's core on a tiny random B = 3 checkpoint: its thresholds are the
ones ``calibrate`` alone gives with the same heads and data, the original checkpoint is left
as it was, exits off runs every loop, and a lenient target makes the engine exit early."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config, write_hf_model
from server_support import write_tiny_tokenizer

from benchmarks.exit_targets import Plan, run
from model.build import convert_checkpoint
from model.calibration_data import calibration_windows, heldout_windows
from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from scheduler.exit_policy import EXITS_OFF
from training.calibrate import calibrate
from training.distill_data import load_tokenizer
from training.exit_heads import HeadTraining

MIDDLE, LENIENT = 0.3, 0.01  # on the tiny model: some exits, and all at loop 0
PLAN = Plan(
    targets=(MIDDLE, LENIENT),
    delta=0.2,
    heads=HeadTraining(steps=5, batch_tokens=64, progress=False),
    tokens=600,
    seq_len=32,
    heldout_tokens=400,
    requests=6,
    prompt_len=(4, 12),
    concurrency=4,
    output_len=6,
    dtype="float32",
)


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("exit_targets")
    src, original = root / "hf", root / "rrt3"
    src.mkdir()
    write_hf_model(src, tiny_llama_config(max_position_embeddings=512))
    write_tiny_tokenizer(src)
    ranks = dict.fromkeys(LINEAR_MODULES, 4)
    convert_checkpoint(src, original, loops=3, init="average", ranks=ranks, evaluate=False)
    before = _digest(original)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPSERVE_HOME", str(root / "home"))  # the self-distilled cache
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            report = run(original, root / "work", PLAN, progress=False)
            copy = Path(report.checkpoint)
            # the independent path: the heads as written, the data re-derived from the copy
            model, tok = load_model(copy), load_tokenizer(copy)
            windows = calibration_windows(model, copy, tok, None, PLAN.tokens, PLAN.seq_len)
            held = heldout_windows(model, copy, tok, PLAN.heldout_tokens, PLAN.seq_len)
            half = windows.shape[0] // 2
            alone = {t: calibrate(model, windows[half:], held, t, PLAN.delta) for t in PLAN.targets}
        finally:
            torch.set_num_threads(threads)
    return report, alone, before, _digest(original), model


def test_thresholds_are_calibrates_own(bench: tuple) -> None:
    report, alone, before, after, model = bench
    assert after == before  # the original checkpoint is untouched
    assert model.exit_heads is not None
    rows = [r for r in report.rows if r.target is not None]
    assert {(r.target, r.measure) for r in rows} == {
        (t, m) for t in PLAN.targets for m in ("prob", "margin", "gate")
    }
    for r in rows:
        result = alone[r.target]
        assert r.thresholds == result.thresholds[r.measure]
        assert r.verified.mean_loops == pytest.approx(result.verified[r.measure].mean_loops)
        assert r.fitted.tokens == result.fitted[r.measure].tokens
        assert r.fitted.coverage == pytest.approx(result.fitted[r.measure].coverage)
    middle = [t for r in rows if r.target == MIDDLE for t in r.thresholds]
    assert any(0 < t <= 1 for t in middle)  # a threshold the data chose: not vacuous
    written = json.loads((Path(report.checkpoint) / "loopserve.json").read_text())["config"]
    assert written["exit_thresholds"] == alone[PLAN.targets[0]].thresholds
    for t in PLAN.targets:
        chosen = [r for r in rows if r.target == t and r.chosen]
        assert len(chosen) <= 1 and all(r.holds for r in chosen)


def test_exits_off_is_the_baseline_and_lenient_targets_exit(bench: tuple) -> None:
    report = bench[0]
    off = report.rows[0]
    assert off.target is None and off.thresholds == [EXITS_OFF, EXITS_OFF]
    assert off.ratio == 1.0 and off.agree_exits_off == 1.0
    assert off.engine.mean_loops == 3.0
    assert off.engine.output_tokens == PLAN.requests * PLAN.output_len
    lenient = [r for r in report.rows if r.target == LENIENT]
    assert any(r.engine.mean_loops < 3.0 for r in lenient)
    for r in report.rows[1:]:
        assert r.ratio == pytest.approx(r.engine.tok_per_s / off.engine.tok_per_s)
        if r.thresholds[0] == 0.0:  # every token may leave after loop 0, and does
            assert r.engine.mean_loops == 1.0
        if all(t > 1 for t in r.thresholds):
            assert r.engine.mean_loops == 3.0
