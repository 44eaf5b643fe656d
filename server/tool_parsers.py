"""Tool calls the model writes in its own format, read back out of its text (vLLM's
``--tool-call-parser``). ``hermes``: the format of Hermes, Qwen2.5 and SmolLM-family templates
with tools — ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call,
after any plain text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

PARSERS: tuple[str, ...] = ("hermes",)
HERMES_OPEN = "<tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    """The text before the first call (None when empty) and the calls as (name, arguments)."""

    content: str | None
    calls: list[tuple[str, dict[str, Any]]]


def parse_hermes(text: str) -> ParsedReply:
    """The calls in ``text``; a reply with no block, or with one that is not a call's JSON
    (a reply cut short, a malformed block), is all content, as vLLM's hermes parser has it."""
    blocks = _HERMES_BLOCK.findall(text)
    if not blocks or text.count(HERMES_OPEN) != len(blocks):  # none, or one left open
        return ParsedReply(text, [])
    calls = []
    for block in blocks:
        try:
            value = json.loads(block)
        except ValueError:
            return ParsedReply(text, [])
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return ParsedReply(text, [])
        args = value.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return ParsedReply(text, [])
        if not isinstance(args, dict):
            return ParsedReply(text, [])
        calls.append((value["name"], args))
    before = text[: text.index(HERMES_OPEN)].strip()
    return ParsedReply(before or None, calls)


def streamable_prefix(text: str) -> str:
    """The part of a growing reply that can go out as content now: everything before a
    ``<tool_call>`` that has begun, or might be beginning at the end of the text."""
    at = text.find(HERMES_OPEN)
    if at >= 0:
        return text[:at]
    for n in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
        if HERMES_OPEN.startswith(text[-n:]):
            return text[:-n]
    return text
