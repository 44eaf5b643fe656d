"""The batched sampler against a per-row float64 reference of the same rules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loopserve_kernels import row_max_lse, use_backend
from scheduler.sampling import SamplingParams, TokenContext, sample_batch


def _reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Float64, one row: temperature, top-k, min-p, top-p — the distribution a draw follows."""
    x = logits.double() / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    probs = x.softmax(-1)
    if p.min_p > 0:
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        probs = x.softmax(-1)
    if p.top_p < 1:
        sp, order = probs.sort(descending=True)
        drop = (sp.cumsum(-1) - sp) >= p.top_p
        drop[0] = False
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return x.softmax(-1)


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_tokens_and_logprobs_equal_the_float64_reference() -> None:
    logits = _logits(7, 301, seed=1)
    params = [SamplingParams(temperature=0.0, logprobs=5)] * 7
    out = sample_batch(logits, params, [0] * 7, torch.Generator().manual_seed(0))
    ref = logits.double().log_softmax(-1)
    assert out.tokens.tolist() == ref.argmax(-1).tolist()
    torch.testing.assert_close(out.logprobs.double(), ref.max(-1).values, atol=1e-5, rtol=0)
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.tolist() == ref.topk(5).indices.tolist()
    torch.testing.assert_close(out.top_logprobs.double(), ref.topk(5).values, atol=1e-5, rtol=0)


def test_seeded_draws_ignore_the_rest_of_the_batch() -> None:
    logits = _logits(6, 97, seed=2)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    other = SamplingParams(temperature=1.3, top_k=7)
    gen = torch.Generator().manual_seed(0)
    alone = sample_batch(logits[2:3], [seeded], [5], gen).tokens.item()
    for mix in range(4):
        params = [other, SamplingParams(temperature=0.0), seeded, other, other, seeded][: 3 + mix]
        idx = [0, 0, 5, 1, 2, 5][: 3 + mix]
        out = sample_batch(logits[: 3 + mix], params, idx, torch.Generator().manual_seed(mix))
        assert out.tokens[2].item() == alone


def test_draws_follow_the_filtered_distribution() -> None:
    """4,000 seeded draws per rule set: every drawn token is allowed by the reference and the
    frequencies match its probabilities (deterministic seeds: not flaky)."""
    logits = _logits(1, 12, seed=3)[0]
    rules = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.2, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    ]
    draws = 4000
    for p in rules:
        params = [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(draws)]
        out = sample_batch(logits.expand(draws, -1), params, [0] * draws, torch.Generator())
        want = _reference_probs(logits, p)
        freq = torch.bincount(out.tokens, minlength=12).double() / draws
        assert (freq[want == 0] == 0).all(), p
        assert (freq - want).abs().max() < 0.03, (p, freq, want)


def test_logprobs_are_of_the_raw_distribution_whatever_the_filters() -> None:
    logits = _logits(3, 50, seed=4)
    params = [SamplingParams(temperature=0.5, top_k=3, seed=i) for i in range(3)]
    out = sample_batch(logits, params, [0, 1, 2], torch.Generator())
    ref = logits.double().log_softmax(-1).gather(1, out.tokens[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_max_lse_equals_the_float64_reference(backend: str, dtype: torch.dtype) -> None:
    """First argmax on ties, max and logsumexp of every row — strided rows, -inf entries and a
    row masked to -inf everywhere included."""
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(6, 2 * 1001, generator=g) * 4).to(dtype)
    logits = wide[:, :1001]  # rows 2002 apart, V contiguous
    logits[1, 7] = logits[1, 500] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, ::3] = float("-inf")
    logits[3] = float("-inf")
    with use_backend(backend):
        argmax, top, lse = row_max_lse(logits)
    ref = logits.double()
    assert argmax.tolist()[:3] + argmax.tolist()[4:] == [
        int(i) for j, i in enumerate(ref.argmax(-1)) if j != 3
    ]
    assert argmax[1] == 7
    torch.testing.assert_close(top.double(), ref.max(-1).values, atol=0, rtol=0)
    torch.testing.assert_close(lse.double(), ref.logsumexp(-1), atol=1e-5, rtol=1e-6)


def _reference_scores(
    logits: torch.Tensor, p: SamplingParams, ctx: TokenContext | None
) -> torch.Tensor:
    """Float64, one row, token by token: logit bias, bans, then vLLM's repetition penalty over
    prompt + output and OpenAI's frequency / presence penalties over the output."""
    x = logits.double().clone()
    for t, b in p.logit_bias:
        x[t] += b
    if ctx is None:
        return x
    for t in ctx.banned:
        x[t] = float("-inf")
    seen = set(ctx.prompt_ids) | set(ctx.output_ids)
    for t in range(x.numel()):
        if t in seen and p.repetition_penalty != 1:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        count = list(ctx.output_ids).count(t)
        x[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return x


_ADJUSTED = [
    (SamplingParams(temperature=0.0, repetition_penalty=1.7), TokenContext([1, 2, 3], [4, 4, 9])),
    (SamplingParams(temperature=0.0, frequency_penalty=1.5), TokenContext([5], [7, 7, 7, 8])),
    (SamplingParams(temperature=0.0, presence_penalty=-2.0), TokenContext([5], [11, 12, 12])),
    (SamplingParams(temperature=0.0, logit_bias=((3, 9.0), (6, -100.0))), None),
    (SamplingParams(temperature=0.0), TokenContext(banned=(0, 1, 2))),
    (SamplingParams(temperature=0.0), None),
    (
        SamplingParams(
            temperature=0.0,
            repetition_penalty=0.6,
            presence_penalty=0.5,
            frequency_penalty=-0.7,
            logit_bias=((0, 2.5),),
        ),
        TokenContext([0, 1, 1, 13], [2, 13, 13, 14], banned=(14,)),
    ),
]


def test_penalties_bias_and_bans_match_the_float64_reference() -> None:
    """Rows with and without adjustments in one batch: each greedy token is the argmax of its
    own reference scores, and logprobs stay those of the raw distribution."""
    rows = len(_ADJUSTED)
    logits = _logits(rows, 16, seed=5)
    # make the adjusted tokens the contenders, so every rule changes some row's choice
    logits[:, :15] += torch.linspace(3, 0, 15)
    params = [p for p, _ in _ADJUSTED]
    contexts = [c for _, c in _ADJUSTED]
    out = sample_batch(logits, params, [0] * rows, torch.Generator(), contexts)
    want = [
        _reference_scores(logits[j], p, c).argmax().item() for j, (p, c) in enumerate(_ADJUSTED)
    ]
    assert out.tokens.tolist() == want
    assert want != logits.argmax(-1).tolist()  # the adjustments changed something
    ref = logits.double().log_softmax(-1).gather(1, out.tokens[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs.double(), ref, atol=1e-5, rtol=0)


def test_penalised_draws_follow_the_reference_distribution() -> None:
    logits = _logits(1, 12, seed=6)[0]
    p = SamplingParams(
        temperature=0.8, top_k=8, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=1
    )
    ctx = TokenContext([0, 1, 2], [6, 8, 8, 5], banned=(4,))
    draws = 4000
    params = [replace(p, seed=s) for s in range(draws)]
    out = sample_batch(
        logits.expand(draws, -1), params, [0] * draws, torch.Generator(), [ctx] * draws
    )
    x = _reference_scores(logits, p, ctx) / p.temperature
    x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    want = x.softmax(-1)
    freq = torch.bincount(out.tokens, minlength=12).double() / draws
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max() < 0.03, (freq, want)
