"""Server-sent events in OpenAI's format and the plumbing that aborts work when a client
goes away, streaming or not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import APIError

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_SECONDS = 0.5


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that always closes its body iterator, so a client leaving mid-stream
    aborts its engine requests at once rather than whenever the generator is collected."""

    def __init__(self, body: AsyncGenerator[str]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()


async def prime(stream: AsyncGenerator[T]) -> AsyncGenerator[T]:
    """Wait for the first item so that refusals (queue full, bad prompt) become HTTP errors
    before the 200 and the event stream start; the result yields everything."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def chained() -> AsyncGenerator[T]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return chained()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(400, "the client disconnected", code="client_disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def events(stream: AsyncGenerator[str]) -> AsyncGenerator[str]:
    """End an SSE stream with ``[DONE]``; an error mid-stream is sent as an error event."""
    try:
        async with aclosing(stream):
            async for event in stream:
                yield event
    except APIError as e:
        yield sse(e.body())
    yield DONE
