"""Helpers every generation route uses: ids, prompt checks, usage."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import TypeVar

from fastapi.responses import Response

from server.errors import bad_request
from server.generation import Generation
from server.params import IGNORED_HEADER
from server.protocol import PromptTokensDetails, Usage
from server.state import ServerState

R = TypeVar("R", bound=Response)
MAX_IGNORED_LISTED = 32
ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"description": desc}
    for code, desc in {
        400: "invalid request",
        401: "missing or wrong API key",
        404: "unknown model",
        408: "request body not received within the body timeout",
        413: "request body too large",
        422: "the request made an engine step fail; only it was failed",
        429: "request queue full (see Retry-After)",
        503: "shutting down or engine stopped (see Retry-After)",
    }.items()
}


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def checked_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    """A prompt the engine can run: not empty, every id inside the model's vocabulary."""
    if not ids:
        raise bad_request("the prompt is empty (it encodes to no tokens)", param)
    vocab = state.info.vocab_size
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", param)
    return ids


def with_ignored(response: R, ignored: list[str]) -> R:
    """Name the request fields loopserve ignored in a response header, so a client can see
    that e.g. an unknown sampling field had no effect (ASCII-escaped, the first
    ``MAX_IGNORED_LISTED``, then how many more). Spaces are escaped too — a header value
    may not start or end with one (a field named " " made the response itself fail) — and
    commas, the list's separator."""
    if ignored:
        names = [_header_safe(n) for n in ignored]
        listed = names[:MAX_IGNORED_LISTED]
        if len(names) > len(listed):
            listed.append(f"...{len(names) - len(listed)} more")
        response.headers[IGNORED_HEADER] = ",".join(listed)
    return response


def _header_safe(name: str) -> str:
    """``name`` as visible ASCII: backslash escapes for non-ASCII, controls, spaces, commas."""
    escaped = name.encode("unicode_escape").decode()
    return escaped.replace(" ", "\\x20").replace(",", "\\x2c")


def usage(gen: Generation) -> Usage:
    prompt, completion = gen.prompt_tokens, gen.completion_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        mean_loops_per_token=gen.mean_loops,
        prompt_tokens_details=None
        if gen.cached_tokens is None
        else PromptTokensDetails(cached_tokens=gen.cached_tokens),
    )


async def drain(gen: Generation) -> None:
    """Run a non-streaming request to its end; its choices hold the results."""
    async with aclosing(gen.outputs()) as outputs:
        async for _ in outputs:
            pass
