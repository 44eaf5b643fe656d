"""Every HTTP response counted by route, method and status, so that load shedding (429), drains
(503) and client errors show in Prometheus, not only in the log."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics


class ResponseCounter:
    """Pure ASGI middleware, outermost: it also sees the 408/413 that ``BodyLimit`` answers.

    The route label is the matched route's template (``/v1/models/{model}``), or ``other`` when
    no route matched, so unknown paths cannot grow the label set without bound.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.http_response(path, scope["method"], status)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not counted:
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # a cancelled request (client gone) got no answer: not counted
            if not counted:  # the outer error handler answers 500 for what escaped
                count(500)
            raise
