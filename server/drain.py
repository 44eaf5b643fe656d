"""Graceful shutdown: drain the engine on SIGTERM/SIGINT, then let uvicorn stop.

uvicorn alone closes its listening socket at the first signal (new clients get "connection
refused", not a 503), waits for in-flight requests without a limit, and re-raises the
signal when it is done, so the process dies of SIGTERM (exit 143) instead of exiting 0.
This server keeps listening while the engine drains: new requests get 503 + ``Retry-After``
(from the engine's ``ShuttingDown``), in-flight ones finish for up to the grace period (the
rest are aborted with an error event), then uvicorn shuts down as usual and ``serve``
returns 0. A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from scheduler.async_engine import AsyncEngine

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that drains ``engine`` for up to ``grace_seconds`` on a signal."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_seconds: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._grace = grace_seconds
        self._signalled = False
        self._drain: asyncio.Task[None] | None = None

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
