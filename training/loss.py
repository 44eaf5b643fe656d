"""The distillation loss: final-loop KD (+ CE) and the early-exit term on every other loop.

Two implementations of one formula. ``distill_loss`` is the reference: it builds the fp32
logits of the teacher and of every student loop at once ([N, S, V] each — over 2 GB at the CPU
recipe's batch, and the memory bottleneck on a GPU). ``chunked_distill_loss`` computes the same
loss in chunks of tokens, Liger-Kernel style (``fused_linear_cross_entropy``): in the forward
pass each chunk's logits are built, the chunk's loss and its gradients with respect to the
hidden states and the exit head's parameters are taken at once, and the logits are freed; the
backward pass only scales the stored gradients. No [N, S, V] tensor ever exists, and no logits
are recomputed. Its loss and gradients equal the reference's up to summation order (tested).

The loss: ``kd · T² · KL(teacher_T ‖ final_T) + ce · CE(final)`` plus, for every intermediate
loop b, ``exit_ce · CE(loop_b) + exit_kd · T² · KL(final_T.detach() ‖ loop_b_T)``. KL terms are
means over every position, CE over the S − 1 positions that have a next token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossWeights:
    """The weights of the loss terms at one step (the exit weights after their warm-up ramp)."""

    kd: float = 1.0
    ce: float = 0.0
    exit_kd: float = 0.1
    exit_ce: float = 0.1
    temperature: float = 1.0

    @property
    def has_exit(self) -> bool:
        return bool(self.exit_kd or self.exit_ce)


def _kl(target_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target ‖ p), both given as log-probabilities [..., V]."""
    return (target_logp.exp() * (target_logp - logp)).sum(-1).mean()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 autocast logits are upcast; a float64 model stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def part_names(loops: int, weights: LossWeights) -> list[str]:
    """Names of the logged loss parts, in the order both implementations return them."""
    names = ["kd", "ce"]
    if weights.has_exit:
        for b in range(loops - 1):
            names += [f"exit{b}_ce", f"exit{b}_kd"]
    return [*names, "loss"]


def distill_loss(
    states: Sequence[torch.Tensor],
    head: Head,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    weights: LossWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss on windows ``ids`` [N, S] from the student's loop hidden states
    (``states``: one [N, S, H] per loop) and its exit ``head`` (final norm + LM head).

    Returns the loss and its parts (detached, in ``part_names`` order).
    """
    t = weights.temperature
    labels = ids[:, 1:].reshape(-1)
    final = _f32(head(states[-1]))  # [N, S, V]
    kd = _kl((_f32(teacher_logits) / t).log_softmax(-1), (final / t).log_softmax(-1)) * t * t
    ce = F.cross_entropy(final[:, :-1].flatten(0, 1), labels)
    loss = weights.kd * kd + weights.ce * ce
    values = [kd, ce]
    if weights.has_exit:
        target = (final.detach() / t).log_softmax(-1)
        for hidden in states[:-1]:
            logits_b = _f32(head(hidden))
            exit_ce = F.cross_entropy(logits_b[:, :-1].flatten(0, 1), labels)
            exit_kd = _kl(target, (logits_b / t).log_softmax(-1)) * t * t
            loss = loss + weights.exit_ce * exit_ce + weights.exit_kd * exit_kd
            values += [exit_ce, exit_kd]
    return loss, torch.stack([*values, loss]).detach()


def _chunk_sums(
    states: Sequence[torch.Tensor],
    head: Head,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    weights: LossWeights,
) -> list[torch.Tensor]:
    """Per-chunk *sums* of every part (KL over rows, CE over rows with a label ≥ 0)."""
    t = weights.temperature
    final = _f32(head(states[-1]))  # [c, V]
    t_logp = (_f32(teacher_logits) / t).log_softmax(-1)
    logp = (final / t).log_softmax(-1)
    sums = [
        (t_logp.exp() * (t_logp - logp)).sum() * t * t,
        F.cross_entropy(final, labels, ignore_index=-100, reduction="sum"),
    ]
    if weights.has_exit:
        target = logp.detach() if t == 1 else (final.detach() / t).log_softmax(-1)
        for hidden in states[:-1]:
            logits_b = _f32(head(hidden))
            logp_b = (logits_b / t).log_softmax(-1)
            sums.append(F.cross_entropy(logits_b, labels, ignore_index=-100, reduction="sum"))
            sums.append((target.exp() * (target - logp_b)).sum() * t * t)
    return sums


class _ChunkedLoss(torch.autograd.Function):
    """Loss forward with gradients taken chunk by chunk in the forward pass.

    Inputs: the loop states [T, H] each, then the head's parameters (so their gradients flow
    back to them through this node). The forward runs ``head`` under ``enable_grad`` on
    detached chunk leaves, so each chunk's graph is local and freed after its
    ``autograd.grad``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        spec: tuple[Head, Callable[[slice], torch.Tensor], torch.Tensor, LossWeights, int, int],
        n_states: int,
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head, teacher_chunk, labels, weights, chunk, n_predicted = spec
        states, params = inputs[:n_states], inputs[n_states:]
        tokens = states[0].shape[0]
        want = [p for p in params if p.requires_grad]
        state_grads = [torch.zeros_like(s) for s in states]
        # Allocated on first use: parameters the head does not touch get no gradient here.
        param_grads: list[torch.Tensor | None] = [None] * len(want)
        totals: list[torch.Tensor] | None = None
        # Each part is a mean: KL terms over every token, CE over the tokens with a next one.
        factors = [weights.kd, weights.ce]
        denoms = [tokens, n_predicted]
        if weights.has_exit:
            factors += [weights.exit_ce, weights.exit_kd] * (n_states - 1)
            denoms += [n_predicted, tokens] * (n_states - 1)
        scale = [w / d for w, d in zip(factors, denoms, strict=True)]
        for start in range(0, tokens, chunk):
            rows = slice(start, min(start + chunk, tokens))
            leaves = [s[rows].detach().requires_grad_(True) for s in states]
            with torch.enable_grad():
                sums = _chunk_sums(leaves, head, teacher_chunk(rows), labels[rows], weights)
                objective = sum(w * v for w, v in zip(scale, sums, strict=True))
                grads = torch.autograd.grad(objective, [*leaves, *want], allow_unused=True)
            for g_acc, g in zip(state_grads, grads[:n_states], strict=True):
                if g is not None:
                    g_acc[rows] = g
            for i, g in enumerate(grads[n_states:]):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            detached = [v.detach() for v in sums]
            totals = detached if totals is None else _add(totals, detached)
        assert totals is not None
        parts = [v / d for v, d in zip(totals, denoms, strict=True)]
        loss = sum(w * v for w, v in zip(factors, parts, strict=True))
        ctx.n_states = n_states
        ctx.has_grad = [p.requires_grad for p in params]
        ctx.param_grads = param_grads  # not inputs or outputs: no save_for_backward needed
        ctx.save_for_backward(*state_grads)
        return loss, torch.stack([*parts, loss])

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_parts: torch.Tensor) -> tuple:
        out: list[torch.Tensor | None] = [g * grad_loss for g in ctx.saved_tensors]
        grads = iter(ctx.param_grads)
        for has_grad in ctx.has_grad:
            g = next(grads) if has_grad else None
            out.append(None if g is None else g * grad_loss)
        ctx.param_grads = None
        return (None, None, *out)


def _add(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x + y for x, y in zip(a, b, strict=True)]


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Flat labels [N·S] for windows ``ids`` [N, S]: the next token, −100 at each last position."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.reshape(-1)


def chunked_distill_loss(
    states: Sequence[torch.Tensor],
    head: Head,
    head_params: Sequence[torch.Tensor],
    teacher_chunk: Callable[[slice], torch.Tensor],
    ids: torch.Tensor,
    weights: LossWeights,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``distill_loss`` computed ``chunk`` tokens at a time; same loss, parts and gradients.

    ``states``: the student's loop hidden states, [N, S, H] each. ``head``: the exit head on
    [c, H] rows (it must act on each token alone). ``head_params``: the parameters ``head`` may
    use (all the student's will do: the trainable ones it touches get their gradients through
    this loss, the others none). ``teacher_chunk``:
    the teacher's logits [c, V] for a slice of the flattened N·S tokens.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    n, s = ids.shape
    flat = [h.reshape(n * s, -1) for h in states]  # [N·S, H] each
    spec = (head, teacher_chunk, next_token_labels(ids), weights, chunk, n * (s - 1))
    return _ChunkedLoss.apply(spec, len(flat), *flat, *head_params)
