"""Exit calibration with a stated guarantee, verified on a second held-out set.

A decode token exits at the first depth b (``b >= min_loops - 1``, ``b < B - 1``) whose exit
confidence is at or above ``threshold[b]``; otherwise it runs all B loops — the rule of
``scheduler.exit_policy``, which the engine applies and verification replays. Confidences
come through the checkpoint's learned exit heads where it has them (``training.exit_heads``).

**The guarantee** (Learn-then-Test with fixed-sequence testing, Angelopoulos et al. 2021):
for each fitted depth b, with probability at least 1 − δ over the calibration tokens, every
threshold returned satisfies P(agree with the full depth | the token exits at b) ≥ target,
for all depths at once. How:

- the calibration tokens are split at random into one fold per fitted depth; depth b's
  threshold is fitted on its own fold, given the (already fixed) thresholds of the depths
  before it, so the tokens reaching b there do not depend on that fold's labels;
- on a fixed grid of thresholds, strict to lenient, each candidate's null hypothesis
  "agreement < target" is tested with the exact binomial tail at level δ / (fitted depths)
  (Bonferroni over depths); the first failure stops the scan and the last rejected candidate
  is the threshold. Candidates admitting fewer tokens than any test could pass with are
  skipped: that depends on counts, never on agreement;
- no rejection, or a fold too small for any test to pass: the depth stays off (``EXITS_OFF``).

The bound treats tokens as independent draws; tokens of one sample are correlated, which is
why the thresholds are then *verified* on disjoint held-out prompts and both numbers reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from loopserve_kernels.dispatch import use_backend
from model.recursive import RecursiveLM
from scheduler.exit_policy import (
    EXIT_MEASURES,
    EXITS_OFF,
    GATE,
    LOGIT_MEASURES,
    confidence,
    exit_depths,
)
from training.exit_heads import HeadReport, HeadTraining, loop_states, train_exit_heads

DELTA = 0.05
GRID: tuple[float, ...] = tuple(1 - 10 ** (-4 + 4 * i / 160) for i in range(161))
"""Candidate thresholds, strict (0.9999) to lenient (0), dense near 1 where "prob" lives.
Fixed before any data are seen, as the fixed-sequence test needs."""


class CalibrationError(ValueError):
    """Calibration input that cannot give thresholds; the message says what is wrong."""


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the p-value of k agreements in n under agreement p."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p >= 1.0:
        return 1.0
    j = torch.arange(k, n + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(j + 1)
        - torch.lgamma(n - j + 1)
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )
    return float(torch.logsumexp(log_pmf, 0).exp().clamp(max=1.0))


def min_tokens(target: float, level: float) -> int:
    """Fewest tokens a test at ``level`` can reject "agreement < target" with (all agree)."""
    if target >= 1.0:
        raise CalibrationError("target 1 cannot be certified from finite data; use < 1")
    return math.ceil(math.log(level) / math.log(target))


def fixed_sequence_threshold(
    conf: torch.Tensor, agree: torch.Tensor, target: float, level: float
) -> float:
    """The last threshold of ``GRID`` (strict to lenient) whose test at ``level`` rejects
    "agreement of tokens with conf >= θ is below target", stopping at the first failure;
    ``EXITS_OFF`` if the first test fails. conf: [T] float, agree: [T] bool."""
    need = min_tokens(target, level)
    order = conf.double().argsort(descending=True)
    c = conf.double()[order]
    hits = torch.cat([torch.zeros(1, dtype=torch.long), agree[order].long().cumsum(0)])
    chosen = EXITS_OFF
    for theta in GRID:
        n = int((c >= theta).sum())  # c is sorted: the first n tokens are admitted
        if n < need:
            continue
        if binomial_tail(int(hits[n]), n, target) > level:
            break
        chosen = theta
    return chosen


@dataclass
class ExitRates:
    """What the exit rule does on a token set: the share of tokens exiting at each depth
    (coverage), how often those agree with the full depth, the same over all tokens and over
    the early exits only, and the expected loops per token."""

    tokens: int
    coverage: list[float]
    agreement: list[float]
    overall_agreement: float
    early_agreement: float
    mean_loops: float


def exit_rates(
    conf: torch.Tensor, agree: torch.Tensor, thresholds: list[float], min_loops: int = 1
) -> ExitRates:
    """Replay the engine's rule (``exit_depths``) over conf/agree [T, B]."""
    t, loops = conf.shape
    depth = exit_depths(conf, thresholds, min_loops)
    hit = agree[torch.arange(t), depth]
    coverage = (torch.bincount(depth, minlength=loops).double() / t).tolist()
    agreement = [
        float(hit[depth == b].double().mean()) if (depth == b).any() else 1.0 for b in range(loops)
    ]
    early = depth < loops - 1
    return ExitRates(
        tokens=t,
        coverage=coverage,
        agreement=agreement,
        overall_agreement=float(hit.double().mean()),
        early_agreement=float(hit[early].double().mean()) if early.any() else 1.0,
        mean_loops=float((depth + 1).double().mean()),
    )


def fit_thresholds(
    conf: torch.Tensor,
    agree: torch.Tensor,
    target: float,
    delta: float = DELTA,
    min_loops: int = 1,
    seed: int = 0,
) -> list[float]:
    """B − 1 thresholds with the guarantee of the module docstring (depths < min_loops − 1,
    and depths whose fold cannot certify any threshold, get ``EXITS_OFF``).

    conf: [T, B] confidence after each loop; agree: [T, B] whether that loop's argmax equals
    the final loop's.
    """
    if not 0 < target < 1:
        raise CalibrationError(f"target must be in (0, 1), got {target}")
    if not 0 < delta < 1:
        raise CalibrationError(f"delta must be in (0, 1), got {delta}")
    if conf.shape != agree.shape or conf.ndim != 2 or conf.shape[0] == 0:
        raise CalibrationError(
            f"need matching non-empty [T, B] confidences and agreements, got "
            f"{tuple(conf.shape)} and {tuple(agree.shape)}"
        )
    t, loops = conf.shape
    fitted = list(range(max(0, min_loops - 1), loops - 1))
    thresholds = [EXITS_OFF] * (loops - 1)
    if not fitted:
        return thresholds
    level = delta / len(fitted)
    folds = torch.randperm(t, generator=torch.Generator().manual_seed(seed)).chunk(len(fitted))
    for b, fold in zip(fitted, folds, strict=True):
        # the fold's tokens that earlier depths (fitted on other folds) let through to b
        running = exit_depths(conf[fold], thresholds, min_loops) >= b
        rows = fold[running]
        thresholds[b] = fixed_sequence_threshold(conf[rows, b], agree[rows, b], target, level)
    return thresholds


@dataclass
class DepthStats:
    """Per token and loop: each measure's confidence [T, B] and agreement with the final
    loop's argmax [T, B]."""

    confidences: dict[str, torch.Tensor]
    agree: torch.Tensor


@torch.no_grad()
def collect_depth_stats(
    model: RecursiveLM, windows: torch.Tensor, batch_size: int = 4
) -> DepthStats:
    """Run every loop's exit head over windows [N, S] (all positions are tokens)."""
    heads = model.exit_heads
    measures = EXIT_MEASURES if heads is not None else LOGIT_MEASURES
    conf: dict[str, list[torch.Tensor]] = {m: [] for m in measures}
    agree = []
    for ids in windows.split(batch_size):
        states = [h.flatten(0, 1) for h in model.loop_hidden_states(ids.to(model.device))]
        # [T, B, V]: each loop through its exit head, as the engine computes it
        logits = torch.stack([model.exit_logits(h, b) for b, h in enumerate(states)], 1)
        agree.append((logits.argmax(-1) == logits[:, -1:].argmax(-1)).cpu())
        for m in LOGIT_MEASURES:
            conf[m].append(confidence(logits, m).cpu())
        if heads is not None:  # the last column is never read: no gate there
            gates = [heads.gate(h, b) for b, h in enumerate(states[:-1])]
            conf[GATE].append(torch.stack([*gates, torch.zeros_like(gates[0])], 1).cpu())
    return DepthStats({m: torch.cat(v) for m, v in conf.items()}, torch.cat(agree))


@dataclass
class CalibrationResult:
    """Thresholds per measure (B − 1 each), the rates they give on the calibration tokens
    (``fitted``) and on the disjoint held-out tokens (``verified``)."""

    target: float
    delta: float
    min_loops: int
    thresholds: dict[str, list[float]]
    fitted: dict[str, ExitRates]
    verified: dict[str, ExitRates]

    def lines(self) -> list[str]:
        some = next(iter(self.fitted.values()))
        held = next(iter(self.verified.values()))
        out = [
            f"calibrated on {some.tokens} tokens, verified on {held.tokens} held-out tokens: "
            f"agreement >= {self.target} per exit depth with probability >= {1 - self.delta}"
        ]
        for m, thresholds in self.thresholds.items():
            thr = " ".join("never" if v > 1 else f"{v:.4f}" for v in thresholds)
            out.append(f"{m:>6}: thresholds {thr}")
            for name, r in (("fitted", self.fitted[m]), ("verified", self.verified[m])):
                cov = " ".join(f"{100 * v:.1f}%" for v in r.coverage)
                agr = " ".join(f"{100 * v:.2f}%" for v in r.agreement[:-1])
                out.append(
                    f"  {name:>8}: coverage per depth {cov} | agreement of exits per depth "
                    f"{agr} | overall {100 * r.overall_agreement:.2f}% | mean loops "
                    f"{r.mean_loops:.3f}"
                )
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(
    model: RecursiveLM,
    windows: torch.Tensor,
    heldout: torch.Tensor,
    target: float = 0.99,
    delta: float = DELTA,
    min_loops: int = 1,
    seed: int = 0,
) -> CalibrationResult:
    """Fit thresholds for every measure on ``windows`` [N, S]; verify them on ``heldout``."""
    if model.config.loops < 2:
        raise CalibrationError("a model with one loop has no early exits to calibrate")
    stats, held = collect_depth_stats(model, windows), collect_depth_stats(model, heldout)
    return fit_and_verify(stats, held, target, delta, min_loops, seed)


def fit_and_verify(
    stats: DepthStats,
    held: DepthStats,
    target: float = 0.99,
    delta: float = DELTA,
    min_loops: int = 1,
    seed: int = 0,
) -> CalibrationResult:
    """:func:`calibrate` on recorded stats: several targets then share one forward pass."""
    thresholds, fitted, verified = {}, {}, {}
    for m, conf in stats.confidences.items():
        thresholds[m] = fit_thresholds(conf, stats.agree, target, delta, min_loops, seed)
        fitted[m] = exit_rates(conf, stats.agree, thresholds[m], min_loops)
        verified[m] = exit_rates(held.confidences[m], held.agree, thresholds[m], min_loops)
    return CalibrationResult(target, delta, min_loops, thresholds, fitted, verified)


@dataclass
class CalibrationInputs:
    """What thresholds are fitted with: the checkpoint's model (with its freshly trained exit
    heads, if any), the windows thresholds are fitted on [N, S], the held-out windows [N', S]
    they are verified on, the windows the heads trained on and their report (None: no heads
    trained)."""

    model: RecursiveLM
    windows: torch.Tensor
    heldout: torch.Tensor
    head_windows: torch.Tensor | None
    report: HeadReport | None


def calibration_inputs(
    model_dir: str | Path,
    data: str | Path | None = None,
    tokens: int = 8192,
    seq_len: int = 256,
    device: str = "cpu",
    progress: bool = True,
    heads: HeadTraining | None = None,
    heldout_tokens: int | None = None,
) -> CalibrationInputs:
    """Load the checkpoint, its calibration windows (``data``, else ``tokens`` tokens it
    samples from the calibration prompt set) and held-out windows (its samples from the
    held-out prompt set, ``heldout_tokens`` of them, default ``HELDOUT_TOKENS``).

    With ``heads``, exit heads are trained first on the first half of the calibration
    windows and the thresholds are to be fitted on the other half, so the tests see data the
    heads did not (the guarantee needs that).
    """
    from model.calibration_data import HELDOUT_TOKENS, calibration_windows, heldout_windows
    from model.checkpoint import LOOPSERVE_CONFIG, load_model
    from training.distill_data import load_tokenizer

    d = Path(model_dir)
    if not (d / LOOPSERVE_CONFIG).exists():
        raise CalibrationError(f"{d} is not a loopserve checkpoint (no {LOOPSERVE_CONFIG})")
    model = load_model(d, device=device)
    tokenizer = load_tokenizer(d)
    # the torch twins, as in training: calibration must not depend on the Triton build
    with use_backend("torch"):
        windows = calibration_windows(model, d, tokenizer, data, tokens, seq_len, progress=progress)
        heldout = heldout_windows(
            model, d, tokenizer, heldout_tokens or HELDOUT_TOKENS, seq_len, progress
        )
        report = head_windows = None
        if heads is not None:
            if windows.shape[0] < 2:
                raise CalibrationError("exit heads need two calibration windows or more")
            half = windows.shape[0] // 2
            head_windows, windows = windows[:half], windows[half:]
            model.exit_heads, report = train_exit_heads(
                model, loop_states(model, head_windows), loop_states(model, heldout), heads
            )
            model.config = replace(model.config, exit_heads=True)
    return CalibrationInputs(model, windows, heldout, head_windows, report)


def write_calibration(
    model_dir: str | Path,
    inputs: CalibrationInputs,
    result: CalibrationResult,
    data: str | Path | None = None,
    seq_len: int = 256,
) -> None:
    """Write thresholds and both reports into ``loopserve.json`` (and trained heads beside
    the weights)."""
    from model.checkpoint import LOOPSERVE_CONFIG, read_loopserve_meta, save_exit_heads
    from model.config import ModelConfig

    d, report = Path(model_dir), inputs.report
    meta = read_loopserve_meta(d)
    meta["config"]["exit_thresholds"] = result.thresholds
    meta["config"]["exit_heads"] = inputs.model.config.exit_heads
    ModelConfig.from_dict(meta["config"])  # refuse to write a config that will not load
    meta.setdefault("provenance", {})["calibration"] = {
        **result.to_dict(),
        "exit_heads": asdict(report) if report is not None else None,
        "data": str(data) if data else "self-distilled, calibration prompt set",
        "heldout": "self-distilled, held-out prompt set",
        "seq_len": seq_len,
    }
    if report is not None:
        save_exit_heads(inputs.model, d)
    tmp = d / (LOOPSERVE_CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(d / LOOPSERVE_CONFIG)


def calibrate_checkpoint(
    model_dir: str | Path,
    target: float = 0.99,
    delta: float = DELTA,
    data: str | Path | None = None,
    tokens: int = 8192,
    seq_len: int = 256,
    min_loops: int = 1,
    write: bool = True,
    device: str = "cpu",
    progress: bool = True,
    heads: HeadTraining | None = None,
) -> tuple[CalibrationResult, HeadReport | None]:
    """What ``loopserve calibrate`` runs: :func:`calibration_inputs`, thresholds fitted on
    the calibration windows and verified on the held-out ones, and (``write``) both written
    into the checkpoint."""
    inputs = calibration_inputs(model_dir, data, tokens, seq_len, device, progress, heads)
    with use_backend("torch"):
        result = calibrate(inputs.model, inputs.windows, inputs.heldout, target, delta, min_loops)
    if write:
        write_calibration(model_dir, inputs, result, data, seq_len)
    return result, inputs.report
