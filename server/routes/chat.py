"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from jinja2 import TemplateError

from scheduler.engine import RequestOutput
from server.errors import ENGINE_ERRORS, bad_request, from_engine
from server.generation import Generation
from server.logprobs import chat_logprobs, vllm_prompt_logprobs
from server.params import check_chat, ignored_fields, max_tokens_for, sampling_params
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
    DeltaToolCall,
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
from server.tool_parsers import streamable_prefix
from server.tools import auto_tools, finish_reason, reply, template_tools, tool_grammar

router = APIRouter(dependencies=[Depends(require_api_key)])
# apply_chat_template's own arguments: a request setting them would change what it returns
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def _arguments(text: str) -> object:
    """Tool-call arguments as templates expect them: the parsed JSON where it parses."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _plain(m: ChatMessage) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        content = "".join(p.text for p in content)
    elif content is None:
        content = ""
    message: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        message["name"] = m.name
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    return message


def render_text(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The conversation as the chat template writes it; a message's ``name`` and the request's
    ``chat_template_kwargs`` reach the template (the flags win over same-named kwargs)."""
    if continue_final_message and (add_generation_prompt or messages[-1].role != "assistant"):
        raise bad_request(
            "continue_final_message needs add_generation_prompt=false and an assistant message "
            "last",
            "continue_final_message",
        )
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(template_kwargs))
    if reserved:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs"
        )
    flags = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "tools": tools,
    }
    try:
        return state.tokenizer.apply_chat_template(
            [_plain(m) for m in messages], tokenize=False, **{**template_kwargs, **flags}
        )
    except (TemplateError, ValueError, TypeError) as e:  # templates raise on what they refuse
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e


def render(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """Token ids of the conversation plus the assistant's turn opener (or, with
    ``continue_final_message``, the last assistant message left open)."""
    text = render_text(
        state,
        body.messages,
        body.add_generation_prompt,
        body.continue_final_message,
        dict(body.chat_template_kwargs or {}),
        template_tools(body),
    )
    ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    return checked_ids(state, ids, "messages")


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, response: Response
) -> ChatCompletionResponse | Response:
    state = get_state(request)
    ignored = ignored_fields(body)
    check_chat(body)
    model = state.check_model(body.model)
    forced = tool_grammar(body, state.settings.auto_tool_parser)
    ids = render(state, body)
    requested = body.max_completion_tokens or body.max_tokens
    tokens_param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens_for(
        requested, len(ids), state.info.max_model_len, True, "messages", tokens_param
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(
        body, max_tokens, logprobs, state.info.vocab_size, state.info.sampling_defaults, forced
    )
    prompt_lp = None
    if body.prompt_logprobs is not None:
        scoring = state.engine.score_prompt(ids, body.prompt_logprobs)
        try:
            scored = await unless_disconnected(request, scoring)
        except ENGINE_ERRORS as e:
            raise from_engine(e) from e
        prompt_lp = vllm_prompt_logprobs(state.tokenizer, scored)
    gen = Generation(state.engine, state.metrics, new_request_id("chatcmpl"), [ids], [params])
    if body.stream:
        outputs = await unless_disconnected(request, prime(gen.outputs()))
        return with_ignored(EventStream(events(_chunks(state, body, model, gen, outputs))), ignored)
    with_ignored(response, ignored)
    await unless_disconnected(request, drain(gen))
    choices = []
    for i, c in enumerate(gen.choices):
        content, calls = reply(body, c.text, state.settings.auto_tool_parser)
        message = AssistantMessage(content=content, tool_calls=calls or [])
        choices.append(
            ChatChoice(
                index=i,
                message=message,
                logprobs=chat_logprobs(state.tokenizer, c.samples) if body.logprobs else None,
                finish_reason=finish_reason(body, c.finish_reason, calls is not None),
            )
        )
    return ChatCompletionResponse(
        id=gen.request_id,
        created=now(),
        model=model,
        choices=choices,
        usage=usage(gen),
        prompt_logprobs=prompt_lp,
    )


async def _chunks(
    state: ServerState,
    body: ChatCompletionRequest,
    model: str,
    gen: Generation,
    outputs: AsyncGenerator[tuple[int, RequestOutput]],
) -> AsyncGenerator[str]:
    created = now()
    continuous = body.stream_options is not None and body.stream_options.continuous_usage_stats

    def chunk(choices: list[ChatChunkChoice], **kw: object) -> str:
        if continuous and "usage" not in kw:
            kw["usage"] = usage(gen)
        resp = ChatCompletionChunk(
            id=gen.request_id, created=created, model=model, choices=choices, **kw
        )
        return sse(resp)

    parser = state.settings.auto_tool_parser
    forced = tool_grammar(body, parser) is not None  # calls are sent whole, once a choice ends
    # auto: text goes out until a call may be starting; the rest waits for the choice's end
    held = auto_tools(body) and parser is not None
    sent = [0] * len(gen.choices)  # characters of each choice's text already sent
    for i in range(len(gen.choices)):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async with aclosing(outputs):
        async for i, out in outputs:
            lp = chat_logprobs(state.tokenizer, out.samples) if body.logprobs else None
            reason = out.finish_reason
            text = gen.choices[i].text
            if reason is not None and (forced or held):
                _, calls = reply(body, text, parser)
                # what is left to send as text: the whole reply without calls; with calls,
                # the text before them (auto) or nothing (a forced reply is all calls)
                shown = text if calls is None else streamable_prefix(text) if held else ""
                delta = DeltaMessage(
                    content=shown[sent[i] :] or None,
                    tool_calls=[
                        DeltaToolCall(index=k, **c.model_dump()) for k, c in enumerate(calls)
                    ]
                    if calls
                    else None,
                )
                reason = finish_reason(body, reason, calls is not None)
            elif held:
                ready = streamable_prefix(text)
                delta = DeltaMessage(content=ready[sent[i] :])
                sent[i] = max(sent[i], len(ready))
            else:
                delta = (
                    DeltaMessage(content=out.text) if out.text and not forced else DeltaMessage()
                )
            if delta.content or delta.tool_calls or reason or lp is not None:
                choice = ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=reason)
                yield chunk([choice])
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage=usage(gen))
