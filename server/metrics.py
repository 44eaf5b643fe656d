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

# vLLM's buckets: a CPU server under load sees TTFTs of tens of seconds, which must not all
# land in +Inf
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
TTFT_BUCKETS += (5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS += (5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
REQUEST_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


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
            "loopserve:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        ).labels(**label)
        self.itl = histogram(
            "loopserve:inter_token_latency_seconds", "Time between tokens.", TOKEN_BUCKETS
        ).labels(**label)
        self.tpot = histogram(
            "loopserve:request_time_per_output_token_seconds",
            "Per sequence: (end - first token) / (output tokens - 1).",
            TOKEN_BUCKETS,
        ).labels(**label)
        self.e2e = histogram(
            "loopserve:e2e_request_latency_seconds", "Request latency.", REQUEST_BUCKETS
        ).labels(**label)
        self.prefill_time = histogram(
            "loopserve:request_prefill_time_seconds",
            "Per sequence: first scheduled to first token.",
            REQUEST_BUCKETS,
        ).labels(**label)
        self.decode_time = histogram(
            "loopserve:request_decode_time_seconds",
            "Per sequence: first token to last token.",
            REQUEST_BUCKETS,
        ).labels(**label)
        self.inference_time = histogram(
            "loopserve:request_inference_time_seconds",
            "Per sequence: first scheduled to last token.",
            REQUEST_BUCKETS,
        ).labels(**label)
        self.request_prompt_tokens = histogram(
            "loopserve:request_prompt_tokens", "Prompt tokens per request.", TOKEN_COUNT_BUCKETS
        ).labels(**label)
        self.request_generation_tokens = histogram(
            "loopserve:request_generation_tokens",
            "Generated tokens per request (all its choices).",
            TOKEN_COUNT_BUCKETS,
        ).labels(**label)
        self.iteration_tokens = histogram(
            "loopserve:iteration_tokens_total",
            "Token rows run per engine step (each row one pass of the block at one depth).",
            TOKEN_COUNT_BUCKETS,
        ).labels(**label)
        self._http = counter(
            "loopserve:http_responses",
            "HTTP responses by route template (other: no route matched), method and status.",
            ("route", "method", "status"),
        )
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
            "loopserve:step_duration_seconds", "Duration of one engine step.", STEP_BUCKETS
        ).labels(**label)
        self.preemptions = counter("loopserve:num_preemptions", "Preempted requests.").labels(
            **label
        )
        self.prefix_queries = counter(
            "loopserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ).labels(**label)
        self.prefix_hits = counter(
            "loopserve:prefix_cache_hits", "Prompt tokens found in the prefix cache."
        ).labels(**label)
        self._label = label
        self._preempted = 0
        self._queried = self._hit = 0

    def finished(self, reason: str) -> None:
        self._success.labels(finished_reason=reason, **self._label).inc()

    def http_response(self, route: str, method: str, status: int) -> None:
        self._http.labels(route=route, method=method, status=str(status), **self._label).inc()

    def observe_step(self, stats: EngineStats) -> None:
        """Called on the engine thread after every step (prometheus_client is thread-safe)."""
        self.step_duration.observe(stats.step_seconds)
        if any(stats.rows_per_depth):
            self.iteration_tokens.observe(sum(stats.rows_per_depth))
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
        if stats.prefix_queries > self._queried:
            self.prefix_queries.inc(stats.prefix_queries - self._queried)
            self.prefix_hits.inc(stats.prefix_hits - self._hit)
            self._queried, self._hit = stats.prefix_queries, stats.prefix_hits
        if stats.preemptions > self._preempted:
            self.preemptions.inc(stats.preemptions - self._preempted)
            self._preempted = stats.preemptions

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
