"""Per-request sampling parameters and the batched sampler.

Seeded requests draw from their own generator, seeded by (seed, output index), so a
request's tokens do not depend on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import row_max_lse

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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


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


def _mask_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
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


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_index: list[int],
    generator: torch.Generator,
    max_lse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> SampledBatch:
    """One token per row of ``logits [R, V]`` (any float dtype; computed in float32): greedy
    rows by argmax, the others by the Gumbel-max trick over their filtered distribution
    (exactly a draw from its softmax), all in a few batched ops and without a host sync.
    ``max_lse``: ``row_max_lse(logits)`` when the caller has it already."""
    tokens, _, lse = row_max_lse(logits) if max_lse is None else max_lse
    sampled = [j for j, p in enumerate(params) if not p.greedy]
    if sampled:
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)
        filtered = _mask_filters(logits.index_select(0, rows).float(), [params[j] for j in sampled])
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
