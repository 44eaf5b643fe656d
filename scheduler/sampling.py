"""Per-request sampling parameters and the batched sampler.

Seeded requests draw from their own generator, seeded by (seed, output index), so a
request's tokens do not depend on which other requests share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loopserve_kernels import row_max_lse
from scheduler.structured import GrammarSpec

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding; validated here so the engine can trust it."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    exit_threshold: float | None = None
    min_loops: int | None = None
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0  # vLLM's: over prompt and output tokens; 1 disables
    presence_penalty: float = 0.0  # OpenAI's: over output tokens
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many were generated
    grammar: GrammarSpec | None = None  # structured output: masks logits before the exit rule

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.n >= 1, "n must be >= 1"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (
                self.exit_threshold is None or self.exit_threshold >= 0,
                "exit_threshold must be >= 0",
            ),
            (self.min_loops is None or self.min_loops >= 1, "min_loops must be >= 1"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (all(t >= 0 for t, _ in self.logit_bias), "logit_bias token ids must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Whether the sampler needs this request's token history."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


@dataclass(frozen=True)
class TokenContext:
    """What the sampler must know of a row's tokens beyond its parameters, given only to rows
    that need it: the history penalties count (views of the request's lists, not copies) and
    the ids banned at this step (EOS and stop ids before ``min_tokens``)."""

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    banned: tuple[int, ...] = ()


@dataclass
class SampleResult:
    """One sampled token with its log-probability and optional top-n alternatives."""

    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class SampledBatch:
    """What ``sample_batch`` drew, still on the device: read it with one host copy."""

    tokens: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] float32, of the raw (unfiltered, untempered) distribution
    top_ids: torch.Tensor | None  # [R, k] int64, k = the most any row asked for
    top_logprobs: torch.Tensor | None  # [R, k] float32


def _mask_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k / min-p / top-p masking of rows [R, V] (float32), each row by its
    own parameters; a filter that no row uses costs nothing."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev)
    logits = logits / temps[:, None]
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(ks) < vocab:
        kth = logits.topk(max(ks), dim=-1).values  # [R, max k], descending
        cut = kth.gather(1, torch.tensor(ks, device=dev)[:, None].clamp_max(max(ks)) - 1)
        keep_all = torch.tensor([k >= vocab for k in ks], device=dev)[:, None]
        logits = logits.masked_fill((logits < cut) & ~keep_all, float("-inf"))
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(-1)
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, -torch.inf)
    if any(p.top_p < 1 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop[:, 0] = False  # a top_p that rounds to 0 in float32 would otherwise drop every token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _uniform_noise(
    rows: int,
    vocab: int,
    params: list[SamplingParams],
    output_index: list[int],
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """U(0, 1) [rows, V]: seeded rows from a generator seeded by (seed, output index) — so a
    request's draws do not depend on what shares its batch — the rest from ``generator``."""
    u = torch.rand((rows, vocab), generator=generator, device=device)
    for j, (p, idx) in enumerate(zip(params, output_index, strict=True)):
        if p.seed is not None:
            gen = torch.Generator(device=device).manual_seed((p.seed * 1_000_003 + idx) % (2**63))
            u[j] = torch.rand(vocab, generator=gen, device=device)
    return u


def _counts(rows: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token id per row, [R, V] float32, by one scatter-add for all rows."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = torch.tensor([t for r in rows for t in r], dtype=torch.int64, device=device)
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)
    counts = torch.zeros(len(rows), vocab, device=device)
    return counts.index_put_((row_of, ids), torch.ones_like(ids, dtype=counts.dtype), True)


def _adjust(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    contexts: Sequence[TokenContext | None],
) -> torch.Tensor:
    """Logit bias, min-token bans, then repetition / frequency / presence penalties (vLLM's
    order and formulas), each one batched op over the rows that use it."""
    dev = logits.device
    bias = [(j, t, b) for j, p in enumerate(params) for t, b in p.logit_bias]
    if bias:
        rows, ids, values = zip(*bias, strict=True)
        at = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
        logits = logits.index_put(at, torch.tensor(values, device=dev), accumulate=True)
    banned = [(j, t) for j, c in enumerate(contexts) if c is not None for t in c.banned]
    if banned:
        rows, ids = zip(*banned, strict=True)
        at = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
        logits = logits.index_put(at, torch.tensor(float("-inf"), device=dev))
    ctx = {j: c for j, c in enumerate(contexts) if c is not None and params[j].penalised}
    if not ctx:
        return logits
    pen = list(ctx)
    vocab = logits.shape[1]
    rows_t = torch.tensor(pen, device=dev)
    sub = logits.index_select(0, rows_t)
    out = _counts([c.output_ids for c in ctx.values()], vocab, dev)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(params[j], name) for j in pen], device=dev)[:, None]

    if any(params[j].repetition_penalty != 1 for j in pen):
        seen = (out + _counts([c.prompt_ids for c in ctx.values()], vocab, dev)) > 0
        rp = column("repetition_penalty")
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    sub = sub - column("frequency_penalty") * out - column("presence_penalty") * (out > 0)
    return logits.index_copy(0, rows_t, sub)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_index: Sequence[int],
    generator: torch.Generator,
    contexts: Sequence[TokenContext | None] | None = None,
    max_lse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> SampledBatch:
    """One token per row of ``logits [R, V]`` (any float dtype; computed in float32): bias,
    bans and penalties first, then greedy rows by argmax, the others by the Gumbel-max trick
    over their filtered distribution (exactly a draw from its softmax), all in a few batched
    ops and without a host sync. ``contexts`` (per row, None where a row needs none) feeds the
    penalties and bans; ``max_lse``: ``row_max_lse(logits)`` when the caller has it already.
    Logprobs are of the raw distribution, as vLLM's default ``raw_logprobs``."""
    tokens, _, lse = row_max_lse(logits) if max_lse is None else max_lse
    scores = logits
    if any(p.logit_bias for p in params) or any(c is not None for c in contexts or ()):
        scores = _adjust(logits.float(), params, contexts or [None] * len(params))
        tokens = scores.argmax(-1)
    sampled = [j for j, p in enumerate(params) if not p.greedy]
    if sampled:
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)
        filtered = _mask_filters(scores.index_select(0, rows).float(), [params[j] for j in sampled])
        u = _uniform_noise(
            len(sampled),
            logits.shape[1],
            [params[j] for j in sampled],
            [output_index[j] for j in sampled],
            generator,
            dev,
        )
        gumbel = -(-u.clamp_min(torch.finfo(u.dtype).tiny).log()).log()
        tokens = tokens.index_copy(0, rows, (filtered + gumbel).argmax(-1))
    logprobs = logits.gather(1, tokens[:, None])[:, 0].float() - lse
    k = max((p.logprobs or 0) for p in params)
    top_ids = top_lp = None
    if k:
        top, top_ids = logits.topk(k, dim=-1)
        top_lp = top.float() - lse[:, None]
    return SampledBatch(tokens, logprobs, top_ids, top_lp)
