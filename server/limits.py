"""Request-body limits enforced before any parsing: size (413, declared length or not) and
read time (408), so a client can neither flood the server nor hold a request open by
trickling its body."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError


class BodyLimit:
    """Pure ASGI middleware: buffers at most ``max_bytes`` of body, read within
    ``timeout_seconds`` of the headers, then replays it."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_seconds):
                body = await self._read(scope, receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.timeout_seconds:g} s"
            await _refuse(APIError(408, message, code="body_timeout"), scope, receive, send)
            return
        except APIError as error:
            await _refuse(error, scope, receive, send)
            return
        if body is None:
            return  # the client left before sending its body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        too_large = APIError(
            413, f"the request body exceeds {self.max_bytes} bytes", code="too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer and close the connection: the rest of the body is never read."""
    error.headers = {**(error.headers or {}), "Connection": "close"}
    await error.response()(scope, receive, send)
