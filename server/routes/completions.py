"""``POST /v1/completions``: prompts as text or token ids, streamed or whole."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from scheduler.engine import RequestOutput
from server.generation import Generation
from server.logprobs import completion_logprobs
from server.params import check_completion, max_tokens_for, sampling_params
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Prompt
from server.routes.common import ERROR_RESPONSES, checked_ids, drain, new_request_id, now, usage
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


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request
) -> CompletionResponse | Response:
    state = get_state(request)
    check_completion(body)
    state.check_model(body.model)
    prompts = encode_prompts(state, body.prompt)
    limit = state.info.max_model_len
    explicit = "max_tokens" in body.model_fields_set
    params = [
        sampling_params(
            body, max_tokens_for(body.max_tokens, len(p), limit, explicit), body.logprobs
        )
        for p in prompts
    ]
    gen = Generation(state.engine, state.metrics, new_request_id("cmpl"), prompts, params)
    echoes = [state.tokenizer.decode(p) if body.echo else "" for p in prompts]
    if body.stream:
        outputs = await unless_disconnected(request, prime(gen.outputs()))
        return EventStream(events(_chunks(state, body, gen, outputs, echoes)))
    await unless_disconnected(request, drain(gen))
    choices = []
    for i, c in enumerate(gen.choices):
        echo = echoes[i // gen.n]
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs(state.tokenizer, c.samples, len(echo))
        choices.append(
            CompletionChoice(
                index=i, text=echo + c.text, logprobs=lp, finish_reason=c.finish_reason
            )
        )
    return CompletionResponse(
        id=gen.request_id, created=now(), model=body.model, choices=choices, usage=usage(gen)
    )


async def _chunks(
    state: ServerState,
    body: CompletionRequest,
    gen: Generation,
    outputs: AsyncGenerator[tuple[int, RequestOutput]],
    echoes: list[str],
) -> AsyncGenerator[str]:
    created = now()

    def chunk(choices: list[CompletionChoice], **kw: object) -> str:
        resp = CompletionResponse(
            id=gen.request_id, created=created, model=body.model, choices=choices, **kw
        )
        return sse(resp)

    offsets = [len(echoes[i // gen.n]) for i in range(len(gen.choices))]
    if body.echo:
        for i in range(len(gen.choices)):
            yield chunk([CompletionChoice(index=i, text=echoes[i // gen.n])])
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
