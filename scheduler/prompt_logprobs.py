"""Log-probabilities of a prompt's own tokens (``echo`` + ``logprobs``, ``prompt_logprobs``):
what lm-evaluation-harness' loglikelihood tasks read.

One cache-free forward through every loop, run on the engine thread between steps. That is the
full-depth distribution, the one early exit approximates, so scores are the model's own
whatever exit threshold serves the generated tokens. The LM head runs in chunks of positions so a
long prompt never holds [S, V] float32 logits at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.recursive import RecursiveLM

HEAD_CHUNK = 256  # positions per LM-head chunk


@dataclass(frozen=True)
class PromptLogprob:
    """Position i's token given the tokens before it: its logprob, its rank (1 = the most
    likely), and the top-n alternatives."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@torch.inference_mode()
def prompt_logprobs(model: RecursiveLM, prompt_ids: list[int], top_n: int) -> list[PromptLogprob]:
    """One entry per prompt token after the first (the first has no context to score it)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    hidden = model.loop_hidden_states(ids)[-1][0, :-1]  # [S-1, H]: predicts tokens 1..S-1
    targets = ids[0, 1:]
    out: list[PromptLogprob] = []
    for lo in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = model.logits(hidden[lo : lo + HEAD_CHUNK]).float()  # [C, V]
        logp = logits.log_softmax(-1)
        tgt = targets[lo : lo + HEAD_CHUNK]
        chosen = logp.gather(1, tgt[:, None])  # [C, 1]
        ranks = (logp > chosen).sum(-1) + 1
        top_lp, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)
        rows = zip(tgt.tolist(), chosen[:, 0].tolist(), ranks.tolist(), strict=True)
        for j, (t, lp, rank) in enumerate(rows):
            top = []
            if top_ids is not None and top_lp is not None:
                top = list(zip(top_ids[j].tolist(), top_lp[j].tolist(), strict=True))
            out.append(PromptLogprob(t, lp, rank, top))
    return out
