"""Exit calibration: per-depth confidence thresholds that keep early exits faithful.

A decode token exits at the first depth b (``b >= min_loops - 1``, ``b < B - 1``) whose exit-
head confidence is at or above ``threshold[b]``; otherwise it runs all B loops — the rule of
``scheduler.exit_policy``, which the engine applies. Thresholds are fitted *sequentially*,
on the tokens still running at each depth — the ones that actually exit there — so that exited
tokens agree with the full-depth argmax at least ``target`` of the time at every depth, judged
by a one-sided Wilson lower bound rather than the raw fraction so the thresholds hold on
unseen text too. A threshold above 1 (``EXITS_OFF``) disables a depth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels.dispatch import use_backend
from model.recursive import RecursiveLM
from scheduler.exit_policy import EXIT_MEASURES, EXITS_OFF, confidence, exits


class CalibrationError(ValueError):
    """Calibration input that cannot give thresholds; the message says what is wrong."""


def wilson_lower(agree: torch.Tensor, count: torch.Tensor, z: float) -> torch.Tensor:
    """One-sided Wilson score lower bound of a proportion (z = 0: the raw fraction)."""
    n = count.double().clamp(min=1)
    p = agree.double() / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * torch.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (centre - spread) / (1 + z2 / n)


def lowest_threshold(conf: torch.Tensor, agree: torch.Tensor, target: float, z: float) -> float:
    """The lowest threshold θ such that tokens with ``conf >= θ`` agree ≥ ``target`` (lower
    bound); ``EXITS_OFF`` if none does. conf: [T] float, agree: [T] bool."""
    if conf.numel() == 0:
        return EXITS_OFF
    order = conf.double().argsort(descending=True)
    c = conf.double()[order]
    hits = agree[order].long().cumsum(0)
    count = torch.arange(1, c.numel() + 1)
    # A threshold admits all tokens tied at it: only prefixes ending on a value change count.
    boundary = torch.ones_like(c, dtype=torch.bool)
    boundary[:-1] = c[:-1] != c[1:]
    ok = boundary & (wilson_lower(hits, count, z) >= target)
    if not ok.any():
        return EXITS_OFF
    return float(c[ok.nonzero()[-1, 0]])


@dataclass
class ExitRates:
    """Per depth under the sequential rule: share of all tokens exiting there and how often
    those agree with the full-depth token; ``mean_loops`` is the expected loops per token."""

    rate: list[float]
    agreement: list[float]
    overall_agreement: float
    mean_loops: float


def fit_thresholds(
    conf: torch.Tensor, agree: torch.Tensor, target: float, min_loops: int = 1, z: float = 1.645
) -> tuple[list[float], ExitRates]:
    """Sequential per-depth thresholds for one measure and the exit rates they give.

    conf: [T, B] confidence after each loop; agree: [T, B] whether that loop's argmax equals the
    final loop's. Returns B − 1 thresholds (depths < min_loops − 1 get ``EXITS_OFF``).
    """
    if not 0 < target <= 1:
        raise CalibrationError(f"target must be in (0, 1], got {target}")
    if conf.shape != agree.shape or conf.ndim != 2 or conf.shape[0] == 0:
        raise CalibrationError(
            f"need matching non-empty [T, B] confidences and agreements, got "
            f"{tuple(conf.shape)} and {tuple(agree.shape)}"
        )
    t, loops = conf.shape
    running = torch.ones(t, dtype=torch.bool)
    thresholds = [EXITS_OFF] * (loops - 1)
    rate = [0.0] * loops
    agreement = [1.0] * loops
    agreed = 0
    for b in range(max(0, min_loops - 1), loops - 1):
        thresholds[b] = lowest_threshold(conf[running, b], agree[running, b], target, z)
        at_b = torch.full((t,), b, dtype=torch.long)
        thr = torch.full((t,), thresholds[b], dtype=conf.dtype)
        leaving = running & exits(conf[:, b], at_b, thr, min_loops, loops - 1)
        n = int(leaving.sum())
        rate[b] = n / t
        agreement[b] = float(agree[leaving, b].double().mean()) if n else 1.0
        agreed += int(agree[leaving, b].sum())
        running &= ~leaving
    rate[-1] = float(running.double().mean())
    agreed += int(running.sum())
    mean_loops = sum((b + 1) * r for b, r in enumerate(rate))
    return thresholds, ExitRates(rate, agreement, agreed / t, mean_loops)


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
    conf: dict[str, list[torch.Tensor]] = {m: [] for m in EXIT_MEASURES}
    agree = []
    for ids in windows.split(batch_size):
        states = model.loop_hidden_states(ids.to(model.device))
        logits = torch.stack([model.logits(h).flatten(0, 1) for h in states], 1)  # [T, B, V]
        agree.append((logits.argmax(-1) == logits[:, -1:].argmax(-1)).cpu())
        for m in EXIT_MEASURES:
            conf[m].append(confidence(logits, m).cpu())
    return DepthStats({m: torch.cat(v) for m, v in conf.items()}, torch.cat(agree))


@dataclass
class CalibrationResult:
    """Thresholds per measure (B − 1 each) and the exit rates they give on the data."""

    target: float
    min_loops: int
    z: float
    tokens: int
    thresholds: dict[str, list[float]]
    rates: dict[str, ExitRates]

    def lines(self) -> list[str]:
        out = [f"calibrated on {self.tokens} tokens, target agreement {self.target}"]
        for m, r in self.rates.items():
            thr = " ".join("never" if v > 1 else f"{v:.4f}" for v in self.thresholds[m])
            rates = " ".join(f"{100 * v:.1f}%" for v in r.rate)
            out.append(
                f"{m:>6}: thresholds {thr} | exit rate per depth {rates} | mean loops "
                f"{r.mean_loops:.3f} | agreement {100 * r.overall_agreement:.2f}%"
            )
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(
    model: RecursiveLM,
    windows: torch.Tensor,
    target: float = 0.99,
    min_loops: int = 1,
    z: float = 1.645,
) -> CalibrationResult:
    """Fit thresholds for every measure on held-out windows [N, S]."""
    if model.config.loops < 2:
        raise CalibrationError("a model with one loop has no early exits to calibrate")
    stats = collect_depth_stats(model, windows)
    thresholds, rates = {}, {}
    for m in EXIT_MEASURES:
        thresholds[m], rates[m] = fit_thresholds(
            stats.confidences[m], stats.agree, target, min_loops, z
        )
    return CalibrationResult(target, min_loops, z, int(stats.agree.shape[0]), thresholds, rates)


def calibrate_checkpoint(
    model_dir: str | Path,
    target: float = 0.99,
    data: str | Path | None = None,
    seq_len: int = 256,
    max_windows: int = 64,
    min_loops: int = 1,
    z: float = 1.645,
    write: bool = True,
    device: str = "cpu",
) -> CalibrationResult:
    """What ``loopserve calibrate`` runs: calibrate on ``data`` (default: the built-in
    evaluation text) and write the thresholds into the checkpoint's ``loopserve.json``."""
    from model.checkpoint import LOOPSERVE_CONFIG, load_model, read_loopserve_meta
    from model.config import ModelConfig
    from model.fidelity import eval_text
    from training.distill_data import load_tokenizer, pack_windows, read_documents

    d = Path(model_dir)
    if write and not (d / LOOPSERVE_CONFIG).exists():
        raise CalibrationError(f"{d} is not a loopserve checkpoint (no {LOOPSERVE_CONFIG})")
    model = load_model(d, device=device)
    tokenizer = load_tokenizer(d)
    # the torch twins, as in training: calibration must not depend on the Triton build
    docs = read_documents([data], tokenizer) if data else [tokenizer(eval_text())["input_ids"]]
    windows = pack_windows(docs, seq_len, tokenizer.eos_token_id)[:max_windows]
    with use_backend("torch"):
        result = calibrate(model, windows, target, min_loops, z)
    if write:
        meta = read_loopserve_meta(d)
        meta["config"]["exit_thresholds"] = result.thresholds
        ModelConfig.from_dict(meta["config"])  # refuse to write a config that will not load
        meta.setdefault("provenance", {})["calibration"] = {
            **result.to_dict(),
            "data": str(data) if data else "builtin eval text",
            "seq_len": seq_len,
            "windows": int(windows.shape[0]),
        }
        tmp = d / (LOOPSERVE_CONFIG + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(d / LOOPSERVE_CONFIG)
    return result
