"""Fit learned exit heads (``model.exit_heads``) on a frozen model's own loop outputs.

Each early depth's affine map is trained so that final norm + LM head of the mapped hidden
state match the model's *final-loop* distribution (forward KL, the tuned-lens objective):
the exit then predicts what the full depth would say, which is what calibration measures
agreement against. The model itself only runs forward, once, to record the hidden states;
the heads train on those, a bounded number of steps or seconds. Each depth's gate learns at
the same time whether that exit's token will be the final loop's (cross-entropy).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.exit_heads import ExitHeads
from model.recursive import RecursiveLM


class HeadTrainingError(ValueError):
    """Head-training settings or data that cannot train heads; the message says why."""


@dataclass(frozen=True)
class HeadTraining:
    """Adam over random token batches; stops after ``steps`` or ``max_seconds``."""

    steps: int = 300
    max_seconds: float = 600.0
    batch_tokens: int = 256
    lr: float = 1e-3
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_tokens < 1 or self.max_seconds <= 0 or self.lr <= 0:
            raise HeadTrainingError(
                f"head training needs positive steps, batch, time and lr: {self}"
            )


@dataclass
class HeadReport:
    """Per early depth, on held-out tokens: mean KL(final loop ‖ exit) without and with the
    maps; the gate's cross-entropy on "this exit's token is the final loop's" beside that of
    the best constant guess (the held-out agreement rate); what it trained on and for."""

    kl_before: list[float]
    kl_after: list[float]
    gate_bce: list[float]
    constant_bce: list[float]
    train_tokens: int
    steps: int
    seconds: float


@torch.no_grad()
def loop_states(model: RecursiveLM, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Hidden state after every loop for every token of windows [N, S] -> [T, B, H]."""
    out = []
    for ids in windows.split(batch_size):
        states = model.loop_hidden_states(ids.to(model.device))
        out.append(torch.stack([h.flatten(0, 1) for h in states], 1))
    return torch.cat(out)


def _losses(
    model: RecursiveLM, heads: ExitHeads, rows: torch.Tensor, b: int, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth b's mean KL(target ‖ exit) and gate cross-entropy over rows [R, B, H], and the
    gate's labels [R] (the exit's argmax is the target's)."""
    logp = model.logits(heads(rows[:, b], b)).float().log_softmax(-1)
    kl = (target.exp() * (target - logp)).sum(-1).mean()
    label = (logp.argmax(-1) == target.argmax(-1)).to(logp.dtype)
    gate = heads.gate_logit(rows[:, b], b).float()
    return kl, F.binary_cross_entropy_with_logits(gate, label), label


@torch.no_grad()
def evaluate_heads(
    model: RecursiveLM, states: torch.Tensor, heads: ExitHeads, chunk: int = 512
) -> tuple[list[float], list[float], list[float]]:
    """Per early depth over states [T, B, H]: mean KL to the final loop, the gate's mean
    cross-entropy and the constant guess's."""
    loops, t = states.shape[1], states.shape[0]
    kl, bce, agree = ([0.0] * (loops - 1) for _ in range(3))
    for rows in states.split(chunk):
        target = model.logits(rows[:, -1]).float().log_softmax(-1)
        for b in range(loops - 1):
            k, g, label = _losses(model, heads, rows, b, target)
            kl[b] += float(k) * rows.shape[0]
            bce[b] += float(g) * rows.shape[0]
            agree[b] += float(label.sum())
    rate = [min(max(a / t, 1e-12), 1 - 1e-12) for a in agree]
    constant = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in rate]
    return [x / t for x in kl], [x / t for x in bce], constant


def train_exit_heads(
    model: RecursiveLM, states: torch.Tensor, heldout: torch.Tensor, config: HeadTraining
) -> tuple[ExitHeads, HeadReport]:
    """Fit one map and gate per early depth on states [T, B, H] of the frozen ``model``;
    report on the held-out states [T', B, H]."""
    t, loops, hidden = states.shape
    if loops < 2:
        raise HeadTrainingError("a model with one loop has no early exits to train heads for")
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    heads = ExitHeads(loops - 1, hidden, dtype=model.dtype, device=model.device)
    kl_before, _, _ = evaluate_heads(model, heldout, heads)  # identity maps: no head
    # a gate starts at a constant 0.5 and its bias must reach the (often lopsided) agreement
    # rate within the step budget: 10x the step size there
    optimizer = torch.optim.Adam(
        [
            {"params": [heads.weight, heads.bias], "lr": config.lr},
            {"params": [heads.gate_weight], "lr": config.lr / 10},
            {"params": [heads.gate_bias], "lr": 10 * config.lr},
        ]
    )
    gen = torch.Generator().manual_seed(config.seed)
    start, step = time.perf_counter(), 0
    bar = tqdm(total=config.steps, desc="exit heads", unit="step", disable=not config.progress)
    try:
        while step < config.steps and time.perf_counter() - start < config.max_seconds:
            rows = states[torch.randint(0, t, (min(config.batch_tokens, t),), generator=gen)]
            with torch.no_grad():
                target = model.logits(rows[:, -1]).float().log_softmax(-1)
            terms = [_losses(model, heads, rows, b, target) for b in range(loops - 1)]
            kl = sum(k for k, _, _ in terms) / (loops - 1)
            loss = sum(k + g for k, g, _ in terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(kl=f"{float(kl.detach()):.3f}")
    finally:
        bar.close()
        for p, g in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(g)
    heads.requires_grad_(False)
    seconds = time.perf_counter() - start
    kl_after, gate_bce, constant = evaluate_heads(model, heldout, heads)
    return heads, HeadReport(kl_before, kl_after, gate_bce, constant, t, step, seconds)
