"""Prometheus metrics, named like vLLM's under ``loopserve:`` with a ``model_name`` label.

The only module that imports prometheus_client: the engine emits ``EngineStats`` dataclasses
and the routes report per-request timings; this adapter turns both into metrics. Gauges read
the engine at scrape time so they are right even while the engine idles (no steps, no stats).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from scheduler.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(
        self,
        model_name: str,
        loops: int,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_usage: Callable[[], float],
        engine_alive: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, ["model_name"], registry=self.registry).labels(**label).set_function(
                read
            )

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["model_name", *extra], registry=self.registry)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], extra: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(
                name, doc, ["model_name", *extra], buckets=buckets, registry=self.registry
            )

        gauge("loopserve:num_requests_running", "Requests being computed.", running)
        gauge("loopserve:num_requests_waiting", "Requests waiting to be scheduled.", waiting)
        gauge("loopserve:kv_cache_usage_perc", "KV-cache usage (1 = full).", kv_usage)
        gauge(
            "loopserve:engine_alive",
            "1 while the engine thread steps, 0 once it died.",
            engine_alive,
        )
        self.prompt_tokens = counter("loopserve:prompt_tokens", "Prefill tokens.").labels(**label)
        self.generation_tokens = counter("loopserve:generation_tokens", "Generated tokens.").labels(
            **label
        )
        self._success = counter(
            "loopserve:request_success", "Finished sequences by reason.", ("finished_reason",)
        )
        self.ttft = histogram(
            "loopserve:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        ).labels(**label)
        self.itl = histogram(
            "loopserve:inter_token_latency_seconds", "Time between tokens.", LATENCY_BUCKETS
        ).labels(**label)
        self.e2e = histogram(
            "loopserve:e2e_request_latency_seconds", "Request latency.", REQUEST_BUCKETS
        ).labels(**label)
        self.queue_time = histogram(
            "loopserve:request_queue_time_seconds", "Time waiting to be scheduled.", REQUEST_BUCKETS
        ).labels(**label)
        depths = tuple(float(d) for d in range(1, loops + 1))
        self.loops_per_token = histogram(
            "loopserve:loops_per_token", "Loops of the block run per generated token.", depths
        ).labels(**label)
        self._exits = counter("loopserve:exits", "Tokens exiting at each loop depth.", ("depth",))
        self._rows = histogram(
            "loopserve:step_rows", "Rows per step at each loop depth.", ROW_BUCKETS, ("depth",)
        )
        self._fills = counter(
            "loopserve:kv_fills", "K/V rows filled for depths an exit skipped.", ("depth",)
        )
        self.step_duration = histogram(
            "loopserve:step_duration_seconds", "Duration of one engine step.", LATENCY_BUCKETS
        ).labels(**label)
        self.preemptions = counter("loopserve:num_preemptions", "Preempted requests.").labels(
            **label
        )
        self._label = label
        self._preempted = 0

    def finished(self, reason: str) -> None:
        self._success.labels(finished_reason=reason, **self._label).inc()

    def observe_step(self, stats: EngineStats) -> None:
        """Called on the engine thread after every step (prometheus_client is thread-safe)."""
        self.step_duration.observe(stats.step_seconds)
        for depth, (rows, exits, fills) in enumerate(
            zip(stats.rows_per_depth, stats.exits_per_depth, stats.fills_per_depth, strict=True)
        ):
            d = str(depth)
            if rows:
                self._rows.labels(depth=d, **self._label).observe(rows)
            if exits:
                self._exits.labels(depth=d, **self._label).inc(exits)
                for _ in range(exits):
                    self.loops_per_token.observe(depth + 1)
            if fills:
                self._fills.labels(depth=d, **self._label).inc(fills)
        if stats.preemptions > self._preempted:
            self.preemptions.inc(stats.preemptions - self._preempted)
            self._preempted = stats.preemptions

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
