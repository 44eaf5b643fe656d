"""Sampled-token log-probabilities in the two OpenAI shapes (completions and chat)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from scheduler.sampling import SampleResult
from server.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def token_text(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, samples: list[SampleResult], offset: int
) -> CompletionLogprobs:
    """Legacy shape: parallel lists; ``top_logprobs`` holds the top-n plus the sampled token."""
    tokens, offsets, tops = [], [], []
    for s in samples:
        text = token_text(tokenizer, s.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top = {token_text(tokenizer, t): lp for t, lp in s.top_logprobs or []}
        top.setdefault(text, s.logprob)
        tops.append(top)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[s.logprob for s in samples],
        top_logprobs=tops,
        text_offset=offsets,
    )


def _top(tokenizer: PreTrainedTokenizerBase, token: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))


def chat_logprobs(
    tokenizer: PreTrainedTokenizerBase, samples: list[SampleResult]
) -> ChoiceLogprobs:
    content = []
    for s in samples:
        tok = _top(tokenizer, s.token, s.logprob)
        alternatives = [_top(tokenizer, t, lp) for t, lp in s.top_logprobs or []]
        content.append(TokenLogprob(**tok.model_dump(), top_logprobs=alternatives))
    return ChoiceLogprobs(content=content)
