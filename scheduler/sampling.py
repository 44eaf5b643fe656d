"""Per-request sampling parameters and the batched sampler.

Seeded requests draw from their own generator, seeded by (seed, output index), so a
request's tokens do not depend on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _filtered_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p masking on one row [V] (float32)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        drop[0] = False  # a top_p that rounds to 0 in float32 would otherwise drop every token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(
    logits: torch.Tensor, p: SamplingParams, output_index: int, generator: torch.Generator
) -> SampleResult:
    """Sample one token from logits [V]; ``generator`` is used only for unseeded requests."""
    logits = logits.float()
    logprobs = logits.log_softmax(-1)
    if p.greedy:
        token = int(logits.argmax())
    else:
        gen = generator
        if p.seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(
                (p.seed * 1_000_003 + output_index) % (2**63)
            )
        probs = _filtered_logits(logits, p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=gen))
    top = None
    if p.logprobs:
        values, ids = logprobs.topk(p.logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return SampleResult(token=token, logprob=float(logprobs[token]), top_logprobs=top)
