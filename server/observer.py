"""The engine's ``on_stats`` hook: feeds metrics and the periodic engine summary log line.

It runs on the engine thread between steps, the one place where reading the scheduler's
requests (for their queue time) is race-free.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from scheduler.engine import Engine, EngineStats
from server.metrics import Metrics

log = logging.getLogger("loopserve.engine")


class EngineObserver:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._lock = threading.Lock()
        self._queued: set[str] = set()  # engine requests whose queue time is recorded
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self._since = now
        self._steps = 0
        self._busy = 0.0
        self._exits = [0] * self.engine.loops

    def __call__(self, stats: EngineStats) -> None:
        self.metrics.observe_step(stats)
        self._record_queue_times()
        with self._lock:
            self._steps += 1
            self._busy += stats.step_seconds
            self._exits = [a + b for a, b in zip(self._exits, stats.exits_per_depth, strict=True)]

    def _record_queue_times(self) -> None:
        scheduler = self.engine.scheduler
        for req in scheduler.running:
            if req.request_id not in self._queued and req.first_scheduled is not None:
                self._queued.add(req.request_id)
                self.metrics.queue_time.observe(req.first_scheduled - req.arrival)
        self._queued.intersection_update(scheduler.requests)

    def summary(self) -> str | None:
        """One line about the last window, or None when the engine was idle throughout."""
        now = time.monotonic()
        with self._lock:
            steps, busy, exits, since = self._steps, self._busy, self._exits, self._since
            self._reset(now)
        s = self.engine.scheduler
        if not steps and not s.has_work:
            return None
        elapsed = max(now - since, 1e-9)
        tokens = sum(exits)
        loops = sum((d + 1) * n for d, n in enumerate(exits)) / tokens if tokens else 0.0
        return (
            f"engine: {steps / elapsed:.1f} steps/s ({100 * busy / elapsed:.0f}% busy), "
            f"{tokens / elapsed:.1f} tokens/s, running {len(s.running)}, waiting "
            f"{s.num_waiting}, KV {100 * s.allocator.usage:.1f}%, loops/token {loops:.2f}, "
            f"exits per depth {exits}, preemptions {s.num_preemptions}"
        )


async def log_summaries(observer: EngineObserver, interval: float) -> None:
    """Log the engine summary every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        line = observer.summary()
        if line is not None:
            log.info(line)
