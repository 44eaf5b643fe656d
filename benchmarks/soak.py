"""Soak: random request / abort / disconnect / burst schedules against a live server, then
the checks that nothing leaked (issue #16).

``tests/test_server_soak.py`` runs a bounded 2,000-schedule pass against a tiny model in
``make test``. This script is the longer variant for a quiet machine, against any running
``loopserve serve``:

    python -m benchmarks.soak --url http://127.0.0.1:8000 --model NAME --schedules 50000 \
        --pid $(pgrep -n -f 'loopserve serve')

It fails (exit 1) on any 5xx, on a stream that ends in an error event or without
``[DONE]``, on requests, queued sequences or KV blocks left when the load stops, and (with
``--pid``) on resident memory growing past ``--rss-growth-mib`` after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sun",
    "moon",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "hello",
    "world",
    "and",
    "of",
    "to",
]
KINDS = ("complete", "stream", "abort", "disconnect", "burst")
BURST = 8  # simultaneous requests in a burst schedule


@dataclass
class SoakReport:
    """What a soak saw: status counts, failures found, and schedules run per kind."""

    schedules: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failed: int = 0

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:  # enough to diagnose, bounded for a long run
            self.failures.append(message)


def _body(rng: random.Random, model: str, stream: bool, max_tokens: int) -> tuple[str, dict]:
    text = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
    body: dict[str, object] = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": rng.random() < 0.5,
        "n": rng.choice([1, 1, 1, 2]),
        "temperature": rng.choice([0.0, 0.8, 1.0]),
        "seed": rng.randint(0, 10**6),
    }
    if rng.random() < 0.5:
        return "/v1/completions", {**body, "prompt": text}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}


def _check_status(report: SoakReport, resp: httpx.Response, what: str) -> None:
    report.statuses[resp.status_code] += 1
    if resp.status_code >= 500:
        report.fail(f"{what}: {resp.status_code} {resp.text[:200]}")
    elif resp.status_code == 429 and not resp.headers.get("retry-after", "").isdigit():
        report.fail(f"{what}: 429 without Retry-After")


async def _whole(client: httpx.AsyncClient, report: SoakReport, path: str, body: dict) -> None:
    resp = await client.post(path, json=body)
    _check_status(report, resp, path)


async def _stream(
    client: httpx.AsyncClient, report: SoakReport, path: str, body: dict, keep: int | None
) -> None:
    """Read a stream to its end, or leave after ``keep`` events (an abort)."""
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            _check_status(report, resp, path)
            return
        report.statuses[200] += 1
        events = 0
        last = ""
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line.removeprefix("data: ")
            events += 1
            if last != "[DONE]" and "error" in json.loads(last):
                report.fail(f"{path}: error event {last[:200]}")
            if keep is not None and events >= keep:
                return
        if last != "[DONE]":
            report.fail(f"{path}: stream ended without [DONE]")


async def _disconnect(
    client: httpx.AsyncClient, report: SoakReport, path: str, body: dict, after: float
) -> None:
    try:
        resp = await client.post(path, json=body, timeout=after)
    except httpx.TimeoutException:
        return
    _check_status(report, resp, path)


async def _schedule(
    client: httpx.AsyncClient, report: SoakReport, model: str, rng: random.Random
) -> None:
    kind = rng.choice(KINDS)
    report.schedules[kind] += 1
    try:
        await _run(client, report, model, rng, kind)
    except httpx.TransportError as e:  # the server dropped a connection it should not have
        report.fail(f"{kind}: {type(e).__name__}: {e}")


async def _run(
    client: httpx.AsyncClient, report: SoakReport, model: str, rng: random.Random, kind: str
) -> None:
    if kind == "burst":
        bodies = [_body(rng, model, rng.random() < 0.5, rng.randint(1, 3)) for _ in range(BURST)]
        await asyncio.gather(*(_whole(client, report, p, b) for p, b in bodies))
        return
    path, body = _body(rng, model, kind in ("stream", "abort"), rng.randint(1, 8))
    if kind == "complete":
        await _whole(client, report, path, body)
    elif kind == "stream":
        await _stream(client, report, path, body, None)
    elif kind == "abort":
        await _stream(client, report, path, body, rng.randint(1, 4))
    else:
        await _disconnect(client, report, path, body, rng.uniform(0.005, 0.1))


async def soak(
    url: str,
    model: str,
    schedules: int,
    concurrency: int = 16,
    seed: int = 0,
    deadline_s: float = 600.0,
    on_progress: Callable[[int], None] | None = None,
) -> SoakReport:
    """Run ``schedules`` random schedules, ``concurrency`` at a time, stopping early at
    ``deadline_s`` (reported as a failure); ``on_progress(done)`` is called every 1,000."""
    report = SoakReport()
    rng = random.Random(seed)
    seeds = [rng.randint(0, 2**32) for _ in range(schedules)]
    next_index = 0
    stop_at = time.monotonic() + deadline_s
    # idle connections expire on the client before the server's 5 s keep-alive closes them,
    # so a request is never sent down a connection the server is closing at that moment
    limits = httpx.Limits(max_connections=concurrency * BURST, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < schedules and time.monotonic() < stop_at:
                i = next_index
                next_index += 1
                await _schedule(client, report, model, random.Random(seeds[i]))
                if on_progress is not None and (i + 1) % 1000 == 0:
                    on_progress(i + 1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if next_index < schedules:
        report.fail(f"deadline: ran {next_index} of {schedules} schedules in {deadline_s} s")
    return report


def server_gauges(url: str) -> dict[str, float]:
    """The engine gauges a leak would show in, from the server's /metrics."""
    names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    got: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in names:
            if line.startswith(f"loopserve:{name}{{"):
                got[name] = float(line.rsplit(" ", 1)[1])
    return got


def wait_drained(url: str, timeout: float = 30) -> dict[str, float]:
    """Gauges once all are 0 (aborts land within a step), or as they are at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = server_gauges(url)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux: /proc/PID/statm)."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * 4096


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--schedules", type=int, default=50_000)
    p.add_argument("--warmup", type=int, default=2_000, help="schedules before the RSS baseline")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds at most")
    p.add_argument("--pid", type=int, help="the server's pid, to bound its RSS growth")
    p.add_argument("--rss-growth-mib", type=float, default=256.0)
    args = p.parse_args(argv)
    warm = asyncio.run(soak(args.url, args.model, args.warmup, args.concurrency, args.seed + 1))
    baseline = rss_bytes(args.pid) if args.pid else None
    report = asyncio.run(
        soak(
            args.url,
            args.model,
            args.schedules,
            args.concurrency,
            args.seed,
            args.deadline,
            lambda done: print(f"{done} schedules", file=sys.stderr),
        )
    )
    report.failures[:0] = warm.failures
    gauges = wait_drained(args.url)
    if any(gauges.values()):
        report.fail(f"left in the engine after the load: {gauges}")
    if baseline is not None:
        growth = (rss_bytes(args.pid) - baseline) / 2**20
        print(f"RSS growth after warm-up: {growth:.1f} MiB")
        if growth > args.rss_growth_mib:
            report.fail(f"RSS grew {growth:.1f} MiB (> {args.rss_growth_mib})")
    print(f"schedules: {dict(report.schedules)}")
    print(f"statuses: {dict(report.statuses)}")
    for f in report.failures:
        print(f"FAIL {f}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
