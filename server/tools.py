"""Tool calling. ``tool_choice: "required"`` or a named function constrains the reply
(xgrammar) to JSON the functions' schemas allow, and that JSON becomes ``tool_calls``.
``auto`` (the default with tools) lets the model choose, so its calls must be read out of its
own format: as in vLLM, only with ``--enable-auto-tool-choice --tool-call-parser NAME``
(``server.tool_parsers``), else a 400 naming the flags."""

from __future__ import annotations

import json
import uuid
from typing import Any

from scheduler.structured import GrammarSpec
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, FunctionCallOut, ToolCallOut
from server.tool_parsers import parse_hermes


def _forced(body: ChatCompletionRequest) -> bool:
    return body.tools is not None and body.tool_choice not in (None, "none", "auto")


def auto_tools(body: ChatCompletionRequest) -> bool:
    """Whether the model chooses between text and calls (``auto``, the default with tools)."""
    return bool(body.tools) and body.tool_choice in (None, "auto")


def tool_grammar(body: ChatCompletionRequest, parser: str | None = None) -> GrammarSpec | None:
    """The JSON schema a tool choice forces, or None when the reply is free text (``auto``
    needs ``parser``, the server's ``--tool-call-parser``)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if auto_tools(body):
        if parser is None:
            raise bad_request(
                "tool_choice 'auto' (the default with tools) needs the server started with "
                "--enable-auto-tool-choice and --tool-call-parser (as vLLM's does); or send "
                "'required', a named function, or 'none'",
                "tool_choice",
            )
        return None
    if choice == "none":
        return None
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in body.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
    else:
        named = [t for t in body.tools if t.function.name == choice.function.name]
        if not named:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                "tool_choice",
            )
        schema = named[0].function.parameters
    if body.response_format is not None and body.response_format.type != "text":
        raise bad_request(
            "a forced tool choice and a response_format both constrain", "tool_choice"
        )
    if body.structured_outputs is not None:
        raise bad_request(
            "a forced tool choice and structured_outputs both constrain", "tool_choice"
        )
    return GrammarSpec("json", json.dumps(schema), "tool_choice")


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template sees them (none with ``tool_choice: "none"``)."""
    if not body.tools or body.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def _call(name: str, arguments: dict[str, Any]) -> ToolCallOut:
    return ToolCallOut(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCallOut(name=name, arguments=json.dumps(arguments)),
    )


def tool_calls(body: ChatCompletionRequest, text: str) -> list[ToolCallOut] | None:
    """The calls a forced reply spells, or None for free text (or a reply cut short)."""
    if not _forced(body):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if body.tool_choice == "required":
        pairs = [(c["name"], c["arguments"]) for c in value]
    else:
        assert not isinstance(body.tool_choice, str) and body.tool_choice is not None
        pairs = [(body.tool_choice.function.name, value)]
    return [_call(name, args) for name, args in pairs]


def reply(
    body: ChatCompletionRequest, text: str, parser: str | None
) -> tuple[str | None, list[ToolCallOut] | None]:
    """(content, calls) of a finished reply: forced calls, calls the model chose (``auto``,
    read by ``parser``), or the text alone."""
    if auto_tools(body) and parser is not None:
        parsed = parse_hermes(text)
        if parsed.calls:
            return parsed.content, [_call(name, args) for name, args in parsed.calls]
        return text, None
    calls = tool_calls(body, text)
    return (text if calls is None else None), calls


def finish_reason(body: ChatCompletionRequest, reason: str | None, called: bool) -> str | None:
    """OpenAI's: ``tool_calls`` when ``required`` or ``auto`` made calls; a named function
    ends ``stop``."""
    if called and reason == "stop" and (body.tool_choice == "required" or auto_tools(body)):
        return "tool_calls"
    return reason
