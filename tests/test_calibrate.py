"""Exit calibration: the exit rule, the fixed-sequence fit's guarantee on synthetic data whose
true agreement is known, refusal on too few tokens, and verification numbers equal to an
independent replay of the engine's rule."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.exit_heads import ExitHeads
from scheduler.exit_policy import EXITS_OFF, confidence, exit_depths, exits
from training.calibrate import (
    GRID,
    CalibrationError,
    binomial_tail,
    calibrate,
    exit_rates,
    fit_thresholds,
    fixed_sequence_threshold,
)


def _synthetic(tokens: int, loops: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences uniform in [0, 1] per depth; a token agrees with the final loop with
    probability 1 − 0.3·(1 − c)², deeper loops a little more often (the final always)."""
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(tokens, loops, generator=gen, dtype=torch.float64)
    depth_bonus = torch.linspace(0, 0.5, loops, dtype=torch.float64)
    p_agree = 1 - 0.3 * (1 - conf).pow(2) * (1 - depth_bonus)
    agree = torch.rand(tokens, loops, generator=gen, dtype=torch.float64) < p_agree
    agree[:, -1] = True
    return conf, agree


def _naive_exit(conf: list[float], thresholds: list[float], min_loops: int) -> int:
    for b in range(len(conf) - 1):
        if b >= min_loops - 1 and conf[b] >= thresholds[b]:
            return b
    return len(conf) - 1


def test_exit_depths_examples() -> None:
    conf = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.95, 0.0], [0.2, 0.3, 0.0], [0.8, 0.8, 0.0]])
    assert exit_depths(conf, [0.8, 0.9]).tolist() == [0, 1, 2, 0]
    assert exit_depths(conf, [0.8, 0.9], min_loops=2).tolist() == [2, 1, 2, 2]
    assert exit_depths(conf, [EXITS_OFF, 0.75]).tolist() == [2, 1, 2, 1]
    assert exit_depths(conf, [0.8, 0.9], min_loops=3).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="thresholds"):
        exit_depths(conf, [0.5])


@settings(max_examples=60, deadline=None)
@given(
    conf=st.lists(st.lists(st.floats(0, 1), min_size=4, max_size=4), min_size=1, max_size=20),
    thresholds=st.lists(st.floats(0, 1.01), min_size=3, max_size=3),
    min_loops=st.integers(1, 4),
)
def test_exit_depths_matches_the_rule(
    conf: list[list[float]], thresholds: list[float], min_loops: int
) -> None:
    got = exit_depths(torch.tensor(conf, dtype=torch.float64), thresholds, min_loops).tolist()
    assert got == [_naive_exit(row, thresholds, min_loops) for row in conf]


def test_confidence_measures() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]]))
    torch.testing.assert_close(confidence(logits, "prob"), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(confidence(logits, "margin"), torch.tensor([0.2, 0.25]))
    with pytest.raises(ValueError, match="entropy"):
        confidence(logits, "entropy")


def _true_agreement(threshold: float, depth: int, loops: int) -> float:
    """P(agree | exit at ``depth``) of ``_synthetic``: confidence columns are independent, so
    exiting at ``depth`` means c_depth >= θ, and E[(1 − c)² | c >= θ] = (1 − θ)² / 3."""
    bonus = depth * 0.5 / (loops - 1)
    return 1 - 0.3 * (1 - bonus) * (1 - threshold) ** 2 / 3


def _exact_tail(k: int, n: int, p: float) -> float:
    q = Fraction(p)
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1)))


@pytest.mark.parametrize(("k", "n", "p"), [(0, 5, 0.5), (3, 5, 0.5), (5, 5, 0.9), (48, 50, 0.97)])
def test_binomial_tail_is_exact(k: int, n: int, p: float) -> None:
    assert binomial_tail(k, n, p) == pytest.approx(_exact_tail(k, n, p), rel=1e-9)


def _naive_fixed_sequence(conf: list[float], agree: list[bool], target: float, level: float):
    """The procedure spelled out: every grid value strict to lenient, exact tails."""
    need = next(n for n in range(1, 10_000) if target**n <= level)
    chosen = EXITS_OFF
    for theta in GRID:
        admitted = [a for c, a in zip(conf, agree, strict=True) if c >= theta]
        if len(admitted) < need:
            continue
        if _exact_tail(sum(admitted), len(admitted), target) > level:
            break
        chosen = theta
    return chosen


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    """Confident tokens agree, a band below them does not, the least confident agree again:
    the whole set passes at θ = 0, but the scan stops in the band and keeps the stricter θ."""
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(3000, generator=gen, dtype=torch.float64)
    agree = (conf > 0.8) | (conf < 0.5) | (torch.rand(3000, generator=gen) < 0.5)
    assert binomial_tail(int(agree.sum()), 3000, 0.8) < 0.05  # θ = 0 alone would pass
    got = fixed_sequence_threshold(conf, agree, 0.8, 0.05)
    assert 0.5 < got < 0.9
    assert got == _naive_fixed_sequence(conf.tolist(), agree.tolist(), 0.8, 0.05)


def test_guarantee_holds_over_seeded_draws() -> None:
    """Over 100 calibration draws whose true per-depth agreement is known in closed form, a
    fitted threshold misses the target (at any depth) in at most δ of the draws, within
    binomial noise; the raw-fraction rule (lowest θ whose sample agreement meets the target)
    misses far more often, so the test can tell a guarantee from none."""
    target, delta, draws, loops = 0.97, 0.1, 100, 3
    misses = naive_misses = exits_taken = 0
    for seed in range(draws):
        conf, agree = _synthetic(3000, loops, seed=seed)
        thresholds = fit_thresholds(conf, agree, target, delta, seed=seed)
        exits_taken += sum(t <= 1 for t in thresholds)
        misses += any(
            t <= 1 and _true_agreement(t, b, loops) < target for b, t in enumerate(thresholds)
        )
        c, a = conf[:, 0].sort(descending=True), agree[:, 0]
        frac = a[c.indices].double().cumsum(0) / torch.arange(1, 3001)
        naive = float(c.values[(frac >= target).nonzero()[-1, 0]])
        naive_misses += _true_agreement(naive, 0, loops) < target
    assert exits_taken > draws  # the fit does exit: not vacuous
    assert misses / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert naive_misses / draws > 0.3


def test_refuses_thresholds_on_too_few_tokens() -> None:
    """Even perfect agreement cannot certify 0.99 at δ/2 = 0.025 from under 367 tokens a
    depth (0.99^n > 0.025): every depth stays off; with enough tokens the same data exit."""
    conf = torch.rand(600, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    agree = torch.ones(600, 3, dtype=torch.bool)
    assert fit_thresholds(conf, agree, 0.99, 0.05) == [EXITS_OFF, EXITS_OFF]
    big = torch.rand(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    every = torch.ones(4000, 3, dtype=torch.bool)
    # all leave at depth 0, so none reaches depth 1 and it has nothing to certify
    assert fit_thresholds(big, every, 0.99) == [0.0, EXITS_OFF]
    assert fit_thresholds(big, every, 0.99, min_loops=2) == [EXITS_OFF, 0.0]


def _replay(conf: torch.Tensor, agree: torch.Tensor, thresholds: list[float], min_loops: int):
    """Coverage, agreement per depth and mean loops, row by row with the engine's ``exits``."""
    t, loops = conf.shape
    depth = []
    for i in range(t):
        for b in range(loops):
            thr = torch.tensor([thresholds[b] if b < loops - 1 else EXITS_OFF])
            if exits(conf[i, b : b + 1].float(), torch.tensor([b]), thr, min_loops, loops - 1):
                depth.append(b)
                break
    coverage = [depth.count(b) / t for b in range(loops)]
    agreement = [
        sum(bool(agree[i, b]) for i in range(t) if depth[i] == b) / max(depth.count(b), 1)
        for b in range(loops)
    ]
    return coverage, agreement, sum(d + 1 for d in depth) / t


@pytest.mark.parametrize("min_loops", [1, 2])
def test_reported_rates_match_the_exit_rule(min_loops: int) -> None:
    conf, agree = _synthetic(2_000, 4, seed=2)
    thresholds = fit_thresholds(conf, agree, 0.95, 0.1, min_loops=min_loops)
    assert any(t <= 1 for t in thresholds)
    rates = exit_rates(conf, agree, thresholds, min_loops)
    coverage, agreement, mean_loops = _replay(conf, agree, thresholds, min_loops)
    assert rates.coverage == pytest.approx(coverage)
    assert [a for a, c in zip(rates.agreement, coverage, strict=True) if c] == pytest.approx(
        [a for a, c in zip(agreement, coverage, strict=True) if c]
    )
    assert rates.mean_loops == pytest.approx(mean_loops)
    if min_loops == 2:
        assert thresholds[0] == EXITS_OFF and rates.coverage[0] == 0


def test_fit_rejects_bad_input() -> None:
    conf, agree = _synthetic(10, 3, seed=0)
    for target, delta in ((1.5, 0.05), (1.0, 0.05), (0.9, 0.0)):
        with pytest.raises(CalibrationError):
            fit_thresholds(conf, agree, target, delta)
    with pytest.raises(CalibrationError):
        fit_thresholds(conf, agree[:, :2], 0.9)


@pytest.mark.parametrize("heads", [False, True])
def test_calibrate_model_verification_matches_the_engine_rule(tiny_hf: tuple, heads: bool) -> None:
    """On a real (tiny) recursive model: the verified numbers are what the engine's rule gives
    on the held-out windows' own per-depth logits, recomputed here from the loop outputs (with
    exit heads: through the heads' weights, applied here as h Wᵀ + bias)."""
    source = load_model(tiny_hf[0])
    model, _ = convert(
        source, loops=3, init="average", ranks=dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )
    h = model.config.arch.hidden_size
    if heads:
        model.exit_heads = ExitHeads(2, h)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.exit_heads.weight.add_(0.5 * torch.randn(2, h, h, generator=gen) / h**0.5)
            model.exit_heads.gate_weight.copy_(torch.randn(2, h, generator=gen) / h**0.5)
        model.config = replace(model.config, exit_heads=True)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 101, (24, 64), generator=gen)
    heldout = torch.randint(0, 101, (8, 64), generator=gen)
    result = calibrate(model, windows, heldout, target=0.3, delta=0.2)
    assert result.fitted["prob"].tokens == windows.numel()
    with torch.no_grad():
        raw = [x.flatten(0, 1) for x in model.loop_hidden_states(heldout)]
        states = raw
        if heads:
            w, bias = model.exit_heads.weight, model.exit_heads.bias
            states = [x @ w[b].T + bias[b] for b, x in enumerate(raw[:2])] + raw[2:]
        logits = torch.stack([model.logits(x) for x in states], 1)  # [T, B, V]
    agree = logits.argmax(-1) == logits[:, -1:].argmax(-1)
    probs = logits.softmax(-1)
    top2 = probs.topk(2, -1).values
    conf = {"prob": top2[..., 0], "margin": top2[..., 0] - top2[..., 1]}
    if heads:  # the gate: a logistic score of the RMS-normalised raw hidden state
        gw, gb = model.exit_heads.gate_weight, model.exit_heads.gate_bias
        gate = [
            torch.sigmoid(x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() @ gw[b] + gb[b])
            for b, x in enumerate(raw[:2])
        ]
        conf["gate"] = torch.stack([*gate, torch.zeros_like(gate[0])], 1)
    assert set(result.thresholds) == set(conf)
    assert any(t <= 1 for t in result.thresholds["prob"])  # some depth exits: not vacuous
    for m, thresholds in result.thresholds.items():
        coverage, agreement, mean_loops = _replay(conf[m], agree, thresholds, 1)
        got = result.verified[m]
        assert got.tokens == heldout.numel()
        assert got.coverage == pytest.approx(coverage)
        assert got.mean_loops == pytest.approx(mean_loops)
        for b in range(3):
            if coverage[b]:
                assert got.agreement[b] == pytest.approx(agreement[b])
    with pytest.raises(CalibrationError):
        calibrate(source, windows, heldout)
