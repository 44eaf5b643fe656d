"""A server started as a subprocess for a benchmark, ready once ``/health`` answers 200, and
stopped (SIGTERM, then SIGKILL) when the benchmark leaves it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from benchmarks.client.datasets import BenchError
from benchmarks.client.streaming import root_url

POLL_SECONDS = 0.5
STOP_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``command`` run in its own process group with its output in ``log``."""

    def __init__(self, command: list[str], url: str, log: Path) -> None:
        self.command, self.url, self.log = command, url, log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        with self.log.open("wb") as out:
            # its own session, so stopping it also stops any workers it forks
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/health`` until 200; a server that exits or never answers is an error."""
        assert self.proc is not None, "wait_ready outside the context"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.command[0]} exited ({self.proc.returncode}); see {self.log}"
                )
            try:
                if httpx.get(root_url(self.url) + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(POLL_SECONDS)
        raise BenchError(f"{self.url} not healthy after {timeout:g} s; see {self.log}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
