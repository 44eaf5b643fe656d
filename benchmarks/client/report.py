"""The run's report: vLLM's text layout on stdout and its result-JSON keys, plus our extras
(failures by kind, per-request start times)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.client.metrics import METRICS, BenchmarkMetrics, RequestResult

WIDTH = 50
_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass(frozen=True)
class RunInfo:
    """What was run, saved beside the numbers so a result file explains itself."""

    backend: str
    base_url: str
    model_id: str
    tokenizer_id: str | None
    dataset: str
    num_prompts: int
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    label: str | None = None


def pct_name(p: float) -> str:
    """``99`` → ``"99"``, ``99.9`` → ``"99.9"`` (vLLM's key spelling)."""
    return str(int(p)) if int(p) == p else str(p)


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def format_report(m: BenchmarkMetrics, info: RunInfo) -> str:
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}"]
    lines.append(_row("Successful requests:", m.completed))
    lines.append(_row("Failed requests:", m.failed))
    for kind, count in sorted(m.errors.items()):
        lines.append(_row(f"  {kind}:", count))
    lines.append(_row("Maximum request concurrency:", info.max_concurrency))
    lines.append(_row("Benchmark duration (s):", m.duration))
    lines.append(_row("Total input tokens:", m.total_input))
    lines.append(_row("Total generated tokens:", m.total_output))
    lines.append(_row("Request throughput (req/s):", m.request_throughput))
    if m.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", m.request_goodput))
    lines.append(_row("Output token throughput (tok/s):", m.output_throughput))
    lines.append(_row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s))
    lines.append(_row("Peak concurrent requests:", m.max_concurrent_requests))
    lines.append(_row("Total Token throughput (tok/s):", m.total_token_throughput))
    for metric in METRICS:
        title, short = _TITLES[metric]
        d = m.latency[metric]
        lines.append(f"{title:-^{WIDTH}}")
        lines.append(_row(f"Mean {short} (ms):", d.mean))
        lines.append(_row(f"Median {short} (ms):", d.median))
        for p, value in d.percentiles.items():
            lines.append(_row(f"P{pct_name(p)} {short} (ms):", value))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def result_dict(m: BenchmarkMetrics, info: RunInfo, results: list[RequestResult]) -> dict:
    """vLLM's result-JSON layout (summary keys + per-request arrays), plus failures by kind."""
    out: dict[str, Any] = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), **asdict(info)}
    if math.isinf(info.request_rate):  # JSON has no inf; vLLM writes the string
        out["request_rate"] = "inf"
    out.update(
        duration=m.duration,
        completed=m.completed,
        failed=m.failed,
        errors_by_kind=m.errors,
        total_input_tokens=m.total_input,
        total_output_tokens=m.total_output,
        request_throughput=m.request_throughput,
        request_goodput=m.request_goodput,
        output_throughput=m.output_throughput,
        total_token_throughput=m.total_token_throughput,
        max_output_tokens_per_s=m.max_output_tokens_per_s,
        max_concurrent_requests=m.max_concurrent_requests,
    )
    for metric, d in m.latency.items():
        out[f"mean_{metric}_ms"] = d.mean
        out[f"median_{metric}_ms"] = d.median
        out[f"std_{metric}_ms"] = d.std
        for p, value in d.percentiles.items():
            out[f"p{pct_name(p)}_{metric}_ms"] = value
    out.update(
        input_lens=[r.prompt_len for r in results],
        output_lens=[r.output_len for r in results],
        start_times=[r.start for r in results],
        latencies=[r.latency for r in results],
        ttfts=[r.ttft for r in results],
        itls=[r.itl for r in results],
        generated_texts=[r.generated_text for r in results],
        errors=[r.error for r in results],
    )
    return out


def result_path(info: RunInfo, result_dir: str | None, filename: str | None, date: str) -> Path:
    """Where ``--save-result`` writes: vLLM's default name,
    ``{label or backend}-{rate}qps[-concurrency{c}]-{model}-{date}.json``, in ``result_dir``."""
    if filename is None:
        rate = "inf" if math.isinf(info.request_rate) else f"{info.request_rate:g}"
        concurrency = f"-concurrency{info.max_concurrency}" if info.max_concurrency else ""
        model = info.model_id.split("/")[-1]
        filename = f"{info.label or info.backend}-{rate}qps{concurrency}-{model}-{date}.json"
    return Path(result_dir or ".") / filename


def save_result(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
