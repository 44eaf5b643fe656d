"""Sampled-token log-probabilities in the two OpenAI shapes (completions and chat)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from scheduler.prompt_logprobs import PromptLogprob
from scheduler.sampling import SampleResult
from server.protocol import (
    ChoiceLogprobs,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
    TokenLogprob,
    TopLogprob,
)


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


def echo_logprobs(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], scored: list[PromptLogprob]
) -> CompletionLogprobs:
    """The legacy shape for an echoed prompt: the first token has no logprob (nothing before
    it), each later one its logprob given the tokens before it."""
    texts = [token_text(tokenizer, t) for t in prompt_ids]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    tops: list[dict[str, float] | None] = [None]
    for text, s in zip(texts[1:], scored, strict=True):
        top = {token_text(tokenizer, t): lp for t, lp in s.top}
        top.setdefault(text, s.logprob)
        tops.append(top)
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[None, *(s.logprob for s in scored)],
        top_logprobs=tops,
        text_offset=offsets,
    )


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def vllm_prompt_logprobs(
    tokenizer: PreTrainedTokenizerBase, scored: list[PromptLogprob]
) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: None for the first token, then per position the prompt's
    token and the top-n, keyed by token id."""
    out: PromptLogprobs = [None]
    for s in scored:
        entry = {
            str(t): PromptTokenLogprob(logprob=lp, rank=r, decoded_token=token_text(tokenizer, t))
            for r, (t, lp) in enumerate(s.top, start=1)
        }
        entry.setdefault(
            str(s.token),
            PromptTokenLogprob(
                logprob=s.logprob, rank=s.rank, decoded_token=token_text(tokenizer, s.token)
            ),
        )
        out.append(entry)
    return out


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
