"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from jinja2 import TemplateError

from scheduler.engine import RequestOutput
from server.errors import bad_request
from server.generation import Generation
from server.logprobs import chat_logprobs
from server.params import check_chat, max_tokens_for, sampling_params
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
)
from server.routes.common import ERROR_RESPONSES, checked_ids, drain, new_request_id, now, usage
from server.state import ServerState, get_state, require_api_key
from server.streaming import EventStream, events, prime, sse, unless_disconnected

router = APIRouter(dependencies=[Depends(require_api_key)])


def render(state: ServerState, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the conversation plus the assistant's turn opener."""
    plain = [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "".join(p.text for p in m.content),
        }
        for m in messages
    ]
    try:
        text = state.tokenizer.apply_chat_template(
            plain, add_generation_prompt=True, tokenize=False
        )
    except (TemplateError, ValueError) as e:  # templates raise on conversations they refuse
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e
    ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    return checked_ids(state, ids, "messages")


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | Response:
    state = get_state(request)
    check_chat(body)
    state.check_model(body.model)
    ids = render(state, body.messages)
    requested = body.max_completion_tokens or body.max_tokens
    tokens_param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens_for(
        requested, len(ids), state.info.max_model_len, True, "messages", tokens_param
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs)
    gen = Generation(state.engine, state.metrics, new_request_id("chatcmpl"), [ids], [params])
    if body.stream:
        outputs = await unless_disconnected(request, prime(gen.outputs()))
        return EventStream(events(_chunks(state, body, gen, outputs)))
    await unless_disconnected(request, drain(gen))
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=c.text),
            logprobs=chat_logprobs(state.tokenizer, c.samples) if body.logprobs else None,
            finish_reason=c.finish_reason,
        )
        for i, c in enumerate(gen.choices)
    ]
    return ChatCompletionResponse(
        id=gen.request_id, created=now(), model=body.model, choices=choices, usage=usage(gen)
    )


async def _chunks(
    state: ServerState,
    body: ChatCompletionRequest,
    gen: Generation,
    outputs: AsyncGenerator[tuple[int, RequestOutput]],
) -> AsyncGenerator[str]:
    created = now()

    def chunk(choices: list[ChatChunkChoice], **kw: object) -> str:
        resp = ChatCompletionChunk(
            id=gen.request_id, created=created, model=body.model, choices=choices, **kw
        )
        return sse(resp)

    for i in range(len(gen.choices)):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async with aclosing(outputs):
        async for i, out in outputs:
            lp = chat_logprobs(state.tokenizer, out.samples) if body.logprobs else None
            if out.text or out.finish_reason or lp is not None:
                delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
                choice = ChatChunkChoice(
                    index=i, delta=delta, logprobs=lp, finish_reason=out.finish_reason
                )
                yield chunk([choice])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage=usage(gen))
