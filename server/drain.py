"""Graceful shutdown: drain the engine on SIGTERM/SIGINT, then let uvicorn stop.

uvicorn alone closes its listening socket at the first signal (new clients get "connection
refused", not a 503), waits for in-flight requests without a limit, and re-raises the
signal when it is done, so the process dies of SIGTERM (exit 143) instead of exiting 0.
This server keeps listening while the engine drains: new requests get 503 + ``Retry-After``
(from the engine's ``ShuttingDown``) and ``/health`` 503 so load balancers move traffic
away, in-flight ones finish for up to the grace period (the rest are aborted with an error
event), then uvicorn shuts down, given at most ``EXIT_SECONDS`` more for the responses just
aborted, and the process exits 0 at once: the engine thread is stopped and every socket
closed, and the interpreter's own teardown of torch and transformers (~1 s) would push the
exit past what the grace promised. A second signal forces the exit.

The server also guards its connections (``server.connections``): request headers must
arrive within the app's ``header_timeout``, and the descriptor limit is raised at startup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from types import FrameType

import uvicorn

from scheduler.async_engine import AsyncEngine
from server.connections import header_deadline_protocol, raise_fd_limit
from server.state import ServerState

log = logging.getLogger(__name__)
EXIT_SECONDS = 0.5  # after the drain: for aborted responses to end before uvicorn stops


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that drains ``engine`` for up to ``grace_seconds`` on a signal.

    ``config.app`` must be an app from ``server.app.create_app``: its settings give the
    header timeout.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_seconds: float) -> None:
        state: ServerState = config.app.state.loopserve
        config.http = header_deadline_protocol(state.settings.header_timeout)
        config.timeout_graceful_shutdown = EXIT_SECONDS  # type: ignore[assignment]
        super().__init__(config)
        self._engine = engine
        self._grace = grace_seconds
        self._signalled = False
        self._drain: asyncio.Task[None] | None = None

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        super().run(sockets)
        if self._drain is not None:  # drained on a signal: nothing is left to clean up
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("file descriptor limit: %d", raise_fd_limit())
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only set flags; the drain starts on the next tick.
        if not self.started or self._signalled:
            self.should_exit = True
            self.force_exit = self._signalled
        self._signalled = True

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._drain is None and not self.should_exit:
            log.info(
                "draining: new requests get 503; up to %.0fs for %d in-flight request(s)",
                self._grace,
                self._engine.num_running + self._engine.num_waiting,
            )
            self._drain = asyncio.create_task(self._engine.shutdown(self._grace))
        if self._drain is not None and self._drain.done():
            self.should_exit = True
        return await super().on_tick(counter)
