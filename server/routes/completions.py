"""``POST /v1/completions``: prompts as text or token ids, streamed or whole; with ``echo`` and
``logprobs`` (or vLLM's ``prompt_logprobs``) the prompt's own tokens are scored too, and
``max_tokens: 0`` scores without generating (lm-evaluation-harness' loglikelihood)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from scheduler.engine import RequestOutput
from scheduler.prompt_logprobs import PromptLogprob
from server.errors import ENGINE_ERRORS, bad_request, from_engine
from server.generation import Generation
from server.logprobs import completion_logprobs, echo_logprobs, joined, vllm_prompt_logprobs
from server.params import check_completion, ignored_fields, max_tokens_for, sampling_params
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Prompt,
    PromptLogprobs,
    Usage,
)
from server.routes.common import (
    ERROR_RESPONSES,
    checked_ids,
    drain,
    new_request_id,
    now,
    usage,
    with_ignored,
)
from server.state import ServerState, get_state, require_api_key
from server.streaming import EventStream, events, prime, sse, unless_disconnected

router = APIRouter(dependencies=[Depends(require_api_key)])


def encode_prompts(state: ServerState, prompt: Prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        prompt = state.tokenizer(list(prompt))["input_ids"]
    return [checked_ids(state, list(ids), "prompt") for ids in prompt]


class _PromptScores:
    """Per prompt: the echoed text, and its tokens' logprobs in the shapes the request asked
    for (the legacy ``logprobs`` of an echo, vLLM's ``prompt_logprobs``)."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        ids: list[int],
        scored: list[PromptLogprob] | None,
    ) -> None:
        self.text = state.tokenizer.decode(ids) if body.echo else ""
        self.logprobs: CompletionLogprobs | None = None
        self.vllm: PromptLogprobs | None = None
        if scored is not None and body.echo and body.logprobs is not None:
            self.logprobs = echo_logprobs(state.tokenizer, ids, scored)
        if scored is not None and body.prompt_logprobs is not None:
            self.vllm = vllm_prompt_logprobs(state.tokenizer, scored)


async def _score(
    state: ServerState, body: CompletionRequest, ids: list[int]
) -> list[PromptLogprob] | None:
    """The prompt's token logprobs when the request needs them, else None."""
    echo_n = body.logprobs if body.echo else None
    if echo_n is None and body.prompt_logprobs is None:
        return None
    top_n = max(echo_n or 0, body.prompt_logprobs or 0)
    try:
        scored: list[PromptLogprob] = await state.engine.score_prompt(ids, top_n)
    except ENGINE_ERRORS as e:
        raise from_engine(e) from e
    return scored


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request, response: Response
) -> CompletionResponse | Response:
    state = get_state(request)
    ignored = ignored_fields(body)
    check_completion(body)
    model = state.check_model(body.model)
    prompts = encode_prompts(state, body.prompt)
    limit = state.info.max_model_len
    if body.max_tokens == 0:
        return with_ignored(await _score_only(state, body, request, model, prompts), ignored)
    explicit = "max_tokens" in body.model_fields_set
    params = [
        sampling_params(
            body,
            max_tokens_for(body.max_tokens, len(p), limit, explicit),
            body.logprobs,
            state.info.vocab_size,
            state.info.sampling_defaults,
        )
        for p in prompts
    ]
    scores = [
        _PromptScores(state, body, p, await unless_disconnected(request, _score(state, body, p)))
        for p in prompts
    ]
    gen = Generation(state.engine, state.metrics, new_request_id("cmpl"), prompts, params)
    if body.stream:
        outputs = await unless_disconnected(request, prime(gen.outputs()))
        stream = EventStream(events(_chunks(state, body, model, gen, outputs, scores)))
        return with_ignored(stream, ignored)
    with_ignored(response, ignored)
    await unless_disconnected(request, drain(gen))
    choices = []
    for i, c in enumerate(gen.choices):
        score = scores[i // gen.n]
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs(state.tokenizer, c.samples, len(score.text))
            lp = lp if score.logprobs is None else joined(score.logprobs, lp)
        choices.append(
            CompletionChoice(
                index=i,
                text=score.text + c.text,
                logprobs=lp,
                finish_reason=c.finish_reason,
                prompt_logprobs=score.vllm,
            )
        )
    return CompletionResponse(
        id=gen.request_id, created=now(), model=model, choices=choices, usage=usage(gen)
    )


async def _score_only(
    state: ServerState,
    body: CompletionRequest,
    request: Request,
    model: str,
    prompts: list[list[int]],
) -> CompletionResponse:
    """``max_tokens: 0``: the echoed prompts and their scores, nothing generated."""
    limit = state.info.max_model_len
    choices = []
    for p in prompts:
        if len(p) > limit:
            raise bad_request(
                f"the prompt has {len(p)} tokens; this model's maximum context length is "
                f"{limit} tokens",
                "prompt",
            )
        score = _PromptScores(
            state, body, p, await unless_disconnected(request, _score(state, body, p))
        )
        for _ in range(body.n):
            choices.append(
                CompletionChoice(
                    index=len(choices),
                    text=score.text,
                    logprobs=score.logprobs,
                    finish_reason="length",
                    prompt_logprobs=score.vllm,
                )
            )
    tokens = sum(len(p) for p in prompts)
    state.metrics.prompt_tokens.inc(tokens)
    return CompletionResponse(
        id=new_request_id("cmpl"),
        created=now(),
        model=model,
        choices=choices,
        usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
    )


async def _chunks(
    state: ServerState,
    body: CompletionRequest,
    model: str,
    gen: Generation,
    outputs: AsyncGenerator[tuple[int, RequestOutput]],
    scores: list[_PromptScores],
) -> AsyncGenerator[str]:
    created = now()
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats

    def chunk(choices: list[CompletionChoice], **kw: object) -> str:
        if continuous and "usage" not in kw:
            kw["usage"] = usage(gen)
        resp = CompletionResponse(
            id=gen.request_id, created=created, model=model, choices=choices, **kw
        )
        return sse(resp)

    offsets = [len(scores[i // gen.n].text) for i in range(len(gen.choices))]
    for i in range(len(gen.choices)):
        score = scores[i // gen.n]
        if body.echo or score.vllm is not None:
            yield chunk(
                [
                    CompletionChoice(
                        index=i,
                        text=score.text,
                        logprobs=score.logprobs,
                        prompt_logprobs=score.vllm,
                    )
                ]
            )
    async with aclosing(outputs):
        async for i, out in outputs:
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(state.tokenizer, out.samples, offsets[i])
                offsets[i] += sum(len(t) for t in lp.tokens)
            if out.text or out.finish_reason or lp is not None:
                choice = CompletionChoice(
                    index=i, text=out.text, logprobs=lp, finish_reason=out.finish_reason
                )
                yield chunk([choice])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage=usage(gen))
