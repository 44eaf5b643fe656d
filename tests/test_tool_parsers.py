"""The hermes tool-call parser (vLLM's ``--tool-call-parser hermes``): calls out of the text,
the text before them as content, anything malformed or cut short left as content."""

from __future__ import annotations

import pytest

from server.tool_parsers import ParsedReply, parse_hermes, streamable_prefix

CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "oslo"}}\n</tool_call>'


def test_calls_and_the_text_before_them() -> None:
    two = f"Let me check.\n{CALL}\n" + CALL.replace("weather", "clock").replace(
        '{"city": "oslo"}', '"{\\"utc\\": true}"'
    )
    assert parse_hermes(two) == ParsedReply(
        "Let me check.", [("weather", {"city": "oslo"}), ("clock", {"utc": True})]
    )
    assert parse_hermes(CALL) == ParsedReply(None, [("weather", {"city": "oslo"})])
    no_args = '<tool_call>{"name": "clock"}</tool_call>'
    assert parse_hermes(no_args) == ParsedReply(None, [("clock", {})])


@pytest.mark.parametrize(
    "text",
    [
        "no calls at all",
        CALL[:-5],  # cut short before its end tag
        CALL + '\n<tool_call>{"name": ',  # a second one cut short
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "x", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>["name", "x"]</tool_call>',
    ],
)
def test_anything_else_is_content(text: str) -> None:
    assert parse_hermes(text) == ParsedReply(text, [])


def test_streamable_prefix_holds_back_what_may_open_a_call() -> None:
    assert streamable_prefix("Sure, ") == "Sure, "
    assert streamable_prefix("Sure, <tool") == "Sure, "
    assert streamable_prefix("Sure, <") == "Sure, "
    assert streamable_prefix("a < b") == "a < b"  # "< b" cannot begin "<tool_call>"
    assert streamable_prefix(f"Sure, {CALL} more") == "Sure, "
