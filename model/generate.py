"""Reference greedy decoding without a cache: the oracle the engine's output is checked against.

Quadratic in length (every step re-runs the whole sequence), so only for tests and short
evaluations; serving goes through the scheduler's paged engine.
"""

from __future__ import annotations

import torch

from model.attention import Window
from model.recursive import RecursiveLM

_HEAD = 1e-4  # a nucleus's entries are first sought above this fraction of its top probability


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


class _BatchKV:
    """Attention with a KV cache for a batch of left-padded sequences, one per row.

    Row i's first ``pads[i]`` columns are padding: no query attends to them (a padding query
    attends to itself only, so every value stays finite). Keys/values are kept per
    (loop depth, block layer); depths −1 and B hold a middle-cycle model's unique first and last
    layers. Steps: the padded prompts [n·W] at once, then one token a row.
    """

    def __init__(self, pads: torch.Tensor, heads: tuple[int, int, int]) -> None:
        self.pads = pads  # [n]
        self.depth = 0
        self.past = 0  # columns already in the cache
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.heads = heads  # (Hq, Hkv, D)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window = 0
    ) -> torch.Tensor:
        assert isinstance(window, int), "every row is at one depth: one window"
        n = self.pads.shape[0]
        hq, hkv, d = self.heads
        # [n·T, H, D] -> [n, H, T, D]
        q = q.view(n, -1, hq, d).transpose(1, 2)
        k = k.view(n, -1, hkv, d).transpose(1, 2)
        v = v.view(n, -1, hkv, d).transpose(1, 2)
        key = (self.depth, layer)
        if key in self.kv:
            k = torch.cat([self.kv[key][0], k], dim=2)
            v = torch.cat([self.kv[key][1], v], dim=2)
        self.kv[key] = (k, v)
        t, s = q.shape[2], k.shape[2]
        qcol = torch.arange(s - t, s, device=q.device)[:, None]  # [T, 1]
        kcol = torch.arange(s, device=q.device)[None, :]  # [1, S]
        valid = (kcol <= qcol) & (kcol >= self.pads.to(q.device)[:, None, None])
        if window:  # columns are positions shifted by the row's padding: same distances
            valid &= kcol > qcol - window
        mask = (valid | (kcol == qcol))[:, None]  # [n, 1, T, S]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True
        )
        return out.transpose(1, 2).reshape(n * t, hq * d)


def _batch_logits(model: RecursiveLM, ids: torch.Tensor, cache: _BatchKV) -> torch.Tensor:
    """Next-token logits [n, V] after columns ``ids`` [n, T] (all loops), filling ``cache``."""
    n, t = ids.shape
    cols = torch.arange(cache.past, cache.past + t)
    positions = (cols[None, :] - cache.pads[:, None]).clamp(min=0).reshape(-1)
    positions = positions.to(model.device)
    cache.depth = -1  # a middle-cycle model's unique first layers: K/V keys of their own
    hidden = model.enter(model.embed_tokens(ids.reshape(-1).to(model.device)), positions, cache)
    for b in range(model.config.loops):
        cache.depth = b
        hidden = model.block_forward(hidden, b, positions, cache)
    cache.depth = model.config.loops  # and its unique last layers
    hidden = model.leave(hidden, positions, cache)
    cache.past += t
    return model.logits(hidden.view(n, t, -1)[:, -1])


def nucleus_sample(
    logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row of ``logits`` [n, V]: the smallest most-probable prefix reaching
    ``top_p``, renormalised, drawn by one ``torch.multinomial`` on [n, V] probabilities.

    Token for token (and generator state) what sorting the whole vocabulary gives, since the
    multinomial sees the same array; but that sort (262k entries for Gemma 3) was the
    sampler's largest cost, so each row sorts only the entries near the top.
    """
    probs = (logits.double() / temperature).softmax(-1).cpu()
    full = torch.zeros_like(probs)  # the sorted, masked array: zeros past every prefix
    ids = []
    for row, p in zip(full, probs, strict=True):
        vals, order = _sorted_head(p, top_p)
        keep = vals.cumsum(0) - vals < top_p  # the smallest prefix reaching top_p
        row[: len(vals)] = vals * keep
        ids.append(order)
    pick = torch.multinomial(full / full.sum(-1, keepdim=True), 1, generator=generator)
    return torch.stack([order[j] for order, j in zip(ids, pick[:, 0].tolist(), strict=True)])


def _sorted_head(p: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading (values, ids) of the descending sort of ``p`` [V], past its top-``top_p``
    prefix: the entries above a threshold, lowered until they hold the prefix's end.

    A subset sorts ties unlike the whole, so where values tie up to the prefix's end the
    whole is sorted.
    """
    tau = float(p.max()) * _HEAD
    while True:
        ids = (p >= tau).nonzero()[:, 0]
        if len(ids) == len(p):
            break
        vals, order = p[ids].sort(descending=True)
        kept = int((vals.cumsum(0) - vals < top_p).sum())  # a CPU cumsum is sequential
        if kept < len(vals):
            if bool((vals[1 : kept + 1] == vals[:kept]).any()):
                break
            return vals, ids[order]
        tau *= _HEAD
    return p.sort(descending=True)


@torch.no_grad()
def sample_continuations(
    model: RecursiveLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 0.95,
    eos_token_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Sampled continuations of ``prompts`` (new tokens only, each ending at its first EOS).

    Nucleus sampling at ``temperature``, all prompts batched (left-padded) with a KV cache, so
    decoding reads the weights once per step for every row; ``generator`` makes it
    reproducible for a given batch. Self-distils calibration and held-out text from a source
    model without external data.
    """
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    a = model.config.arch
    width = max(map(len, prompts))
    pads = torch.tensor([width - len(p) for p in prompts])
    ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts])
    cache = _BatchKV(pads, (a.num_heads, a.num_kv_heads, a.head_dim))
    logits = _batch_logits(model, ids, cache)
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        tokens = nucleus_sample(logits, generator, temperature, top_p)
        for i, tok in enumerate(tokens.tolist()):
            if not done[i]:
                outs[i].append(tok)
                done[i] = tok in eos_token_ids
        if all(done):
            break
        logits = _batch_logits(model, tokens[:, None], cache)
    return outs
