"""The load loop: requests released on their arrival times, at most ``max_concurrency`` in
flight, the whole run cut at ``max_duration``; bounded in requests and in time."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.client.arrivals import arrival_times
from benchmarks.client.datasets import SampleRequest
from benchmarks.client.metrics import RequestResult
from benchmarks.client.streaming import Endpoint, send


@dataclass(frozen=True)
class LoadConfig:
    """How requests arrive: rate (inf: all at once), gap shape, concurrency cap, time cap."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    max_duration: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("request rate and burstiness must be > 0 (rate inf: all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_duration is not None and self.max_duration <= 0:
            raise ValueError(f"max duration must be > 0 s, got {self.max_duration}")


@dataclass(frozen=True)
class RunOutcome:
    """Every request's result, in dataset order, and the run's wall time in seconds."""

    results: list[RequestResult]
    duration: float


async def run_load(
    endpoint: Endpoint,
    requests: list[SampleRequest],
    load: LoadConfig,
    tokenizer: Any = None,
) -> RunOutcome:
    """Send ``requests`` to ``endpoint`` as ``load`` says and time each one."""
    due = arrival_times(len(requests), load.request_rate, load.burstiness, load.seed)
    gate = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    results = [RequestResult(error="max duration: not sent in time") for _ in requests]
    # the pool must not cap concurrency itself: queueing for a connection would count as TTFT
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = tqdm(total=len(requests), disable=not load.progress, unit="req")
    t0 = time.perf_counter()

    async def one(i: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, due[i] - (time.perf_counter() - t0)))
        async with gate or contextlib.nullcontext():
            results[i].error = "max duration: in flight at the deadline"
            results[i] = await send(client, endpoint, requests[i], t0, tokenizer)
        bar.update()

    async with httpx.AsyncClient(timeout=endpoint.timeout, limits=limits) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(len(requests))]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=load.max_duration)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - t0
    bar.close()
    return RunOutcome(results, duration)
