"""Fit learned exit heads (``model.exit_heads``) on a frozen model's own loop outputs.

Each early depth's affine map is trained so that final norm + LM head of the mapped hidden
state match the model's *final-loop* distribution (forward KL, the tuned-lens objective):
the exit then predicts what the full depth would say, which is what calibration measures
agreement against. The model itself only runs forward, once, to record the hidden states;
the heads train on those, a bounded number of steps or seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
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
    """Per early depth: mean KL(final loop ‖ exit) on held-out tokens without and with the
    heads; the tokens, steps and seconds they trained on and for."""

    kl_before: list[float]
    kl_after: list[float]
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


def _kl(model: RecursiveLM, hidden: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(target ‖ exit logits of hidden) over rows."""
    logp = model.logits(hidden).float().log_softmax(-1)
    return (target_logp.exp() * (target_logp - logp)).sum(-1).mean()


@torch.no_grad()
def head_kl(
    model: RecursiveLM, states: torch.Tensor, heads: ExitHeads | None, chunk: int = 512
) -> list[float]:
    """Mean KL(final loop ‖ depth b's exit) per early depth b, over states [T, B, H]."""
    loops = states.shape[1]
    total = [0.0] * (loops - 1)
    for rows in states.split(chunk):
        target = model.logits(rows[:, -1]).float().log_softmax(-1)
        for b in range(loops - 1):
            h = rows[:, b] if heads is None else heads(rows[:, b], b)
            total[b] += float(_kl(model, h, target)) * rows.shape[0]
    return [t / states.shape[0] for t in total]


def train_exit_heads(
    model: RecursiveLM, states: torch.Tensor, heldout: torch.Tensor, config: HeadTraining
) -> tuple[ExitHeads, HeadReport]:
    """Fit one head per early depth on states [T, B, H] of the frozen ``model``; report KL on
    the held-out states [T', B, H]."""
    t, loops, hidden = states.shape
    if loops < 2:
        raise HeadTrainingError("a model with one loop has no early exits to train heads for")
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    heads = ExitHeads(loops - 1, hidden, dtype=model.dtype, device=model.device)
    optimizer = torch.optim.Adam(heads.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    start, step = time.perf_counter(), 0
    bar = tqdm(total=config.steps, desc="exit heads", unit="step", disable=not config.progress)
    try:
        while step < config.steps and time.perf_counter() - start < config.max_seconds:
            rows = states[torch.randint(0, t, (min(config.batch_tokens, t),), generator=gen)]
            with torch.no_grad():
                target = model.logits(rows[:, -1]).float().log_softmax(-1)
            loss = sum(_kl(model, heads(rows[:, b], b), target) for b in range(loops - 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(kl=f"{float(loss.detach()) / (loops - 1):.3f}")
    finally:
        bar.close()
        for p, g in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(g)
    heads.requires_grad_(False)
    seconds = time.perf_counter() - start
    before, after = head_kl(model, heldout, None), head_kl(model, heldout, heads)
    return heads, HeadReport(before, after, t, step, seconds)
