"""Per-request timings and the summary metrics computed from them, in vLLM's conventions
(``benchmarks/benchmark_serving.py``), so a loopserve figure can sit beside a vLLM figure.

- TTFT: request sent → first content chunk.
- TPOT: per request, (latency − TTFT) / (output tokens − 1), for requests with > 1 token.
- ITL: every gap between consecutive content chunks, pooled over requests.
- E2EL: request sent → stream end.
- goodput: completed requests per second that meet every SLO given (ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one request did; ``error`` is set (and ``success`` false) for every failure."""

    success: bool = False
    error: str = ""
    start: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_len: int = 0
    generated_text: str = ""

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first; 0 for one-token outputs (vLLM's rule)."""
        if self.output_len <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]

    @classmethod
    def of(cls, seconds: list[float], percentiles: list[float]) -> Distribution:
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        if ms.size == 0:  # no data reads as zeros, as vLLM reports it
            return cls(0.0, 0.0, 0.0, {p: 0.0 for p in percentiles})
        pct = {p: float(np.percentile(ms, p)) for p in percentiles}
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()), pct)


@dataclass(frozen=True)
class BenchmarkMetrics:
    """The run's summary: counts, throughputs and one distribution per latency metric."""

    completed: int
    failed: int
    errors: dict[str, int]
    duration: float
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    latency: dict[str, Distribution]
    max_output_tokens_per_s: float = 0.0
    max_concurrent_requests: int = 0


def peaks(results: list[RequestResult]) -> tuple[float, int]:
    """vLLM's peak lines, its way: whole seconds from the first request's start; the most
    content chunks (tokens, when each chunk holds one) arriving within one second, and the
    most requests whose [start, end] touches one second (requests *during* that second, not
    at one instant: it can exceed ``--max-concurrency``)."""
    ok = [r for r in results if r.success]
    if not ok:
        return 0.0, 0
    t0 = min(r.start for r in results)
    arrivals = []
    for r in ok:
        t = r.start + r.ttft
        arrivals.append(t)
        for gap in r.itl:
            t += gap
            arrivals.append(t)
    tokens = np.bincount(np.floor(np.asarray(arrivals) - t0).astype(np.int64)).max()
    concurrent = np.zeros(int(max(r.start + r.latency for r in ok) - t0) + 2, dtype=np.int64)
    for r in ok:
        concurrent[int(r.start - t0) : int(r.start + r.latency - t0) + 1] += 1
    return float(tokens), int(concurrent.max())


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` → ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput wants NAME:MS with NAME in {SLO_METRICS}, got {spec!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput {name!r}: not a number of ms: {value!r}") from None
        if slos[name] < 0:
            raise ValueError(f"goodput {name!r} must be >= 0 ms, got {value}")
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values_ms = {"ttft": r.ttft * 1000, "tpot": r.tpot * 1000, "e2el": r.latency * 1000}
    return all(values_ms[name] <= limit for name, limit in slos.items())


def error_kind(message: str) -> str:
    """The part of an error message before the first ':' ("HTTP 500", "timeout", ...)."""
    return message.split(":", 1)[0]


def compute_metrics(
    results: list[RequestResult],
    duration: float,
    percentiles: list[float],
    slos: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    """Summarise ``results`` of a run that took ``duration`` seconds of wall time."""
    ok = [r for r in results if r.success]
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[error_kind(r.error)] = errors.get(error_kind(r.error), 0) + 1
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    per_second = 1.0 / duration if duration > 0 else 0.0
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.output_len > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    goodput = None
    if slos:
        goodput = sum(meets_slos(r, slos) for r in ok) * per_second
    peak_tokens, peak_requests = peaks(results)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=errors,
        duration=duration,
        total_input=total_in,
        total_output=total_out,
        request_throughput=len(ok) * per_second,
        request_goodput=goodput,
        output_throughput=total_out * per_second,
        total_token_throughput=(total_in + total_out) * per_second,
        latency={m: Distribution.of(series[m], percentiles) for m in METRICS},
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_requests,
    )
