"""Connection hygiene for slow or idle clients, below the ASGI app where uvicorn leaves gaps.

uvicorn closes a kept-alive connection after ``timeout_keep_alive``, but a fresh connection
that never sends a request, or sends half its headers, stays open for ever: a few hundred
of them exhaust the process's file descriptors and ``/health`` stops answering. The body
read timeout lives in ``server.limits`` (the app sees the body; it answers 408).
"""

from __future__ import annotations

import asyncio
import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class _HeaderDeadlineProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose request line and headers have not all
    arrived ``header_timeout`` seconds after it opened (or, kept alive, after the next
    request's first byte). Re-armed per request, never extended by a trickle of bytes."""

    header_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for (the rest of) headers
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.timeout_keep_alive_handler()  # closes the connection, as an idle keep-alive


def header_deadline_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's ``http=`` class for a server that drops connections slow to send headers."""
    return type(
        "HeaderDeadlineProtocol", (_HeaderDeadlineProtocol,), {"header_timeout": header_timeout}
    )


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one (often 1024 → 1M in containers), so
    idle connections run into the header timeout long before they run out of descriptors.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # an infinite hard limit may be refused
            log.warning("could not raise the file descriptor limit from %d: %s", soft, e)
    return soft
