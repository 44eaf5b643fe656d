"""Reference greedy decoding without a cache: the oracle the engine's output is checked against.

Quadratic in length (every step re-runs the whole sequence), so only for tests and short
evaluations; serving goes through the scheduler's paged engine.
"""

from __future__ import annotations

import torch

from model.recursive import RecursiveLM


@torch.no_grad()
def greedy_generate(
    model: RecursiveLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    num_loops: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (new tokens only), stopping after an EOS."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model.loop_hidden_states(ids, num_loops)[-1][:, -1]
        token = int(model.logits(hidden).argmax(-1))
        out.append(token)
        if token in eos_token_ids:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return out
