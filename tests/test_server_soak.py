"""A bounded soak (issue #16): 2,000 random request / abort / disconnect / burst schedules
over HTTP against a tiny model with a small queue and KV pool, after which nothing may be
left: no request running or waiting, no KV block in use, no 5xx, every read stream ended
with ``[DONE]`` and no error event, and resident memory within 64 MiB of what it was after
a 200-schedule warm-up. The longer variant is ``python -m benchmarks.soak``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator

import pytest
from server_support import LiveServer, write_tiny_rrt

from benchmarks.soak import rss_bytes, soak, wait_drained
from server.settings import ServeSettings

SCHEDULES = 2_000
RSS_GROWTH_BOUND = 64 * 2**20


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = ServeSettings(
        model=str(write_tiny_rrt(tmp_path_factory.mktemp("soak"))),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="512KiB",  # small enough that bursts preempt
        max_model_len=64,
        max_num_seqs=8,
        max_queue=16,  # small enough that bursts meet 429s
        threads=1,
    )
    with LiveServer(settings) as server:
        yield server


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc")
def test_soak_leaves_nothing_behind(live: LiveServer) -> None:
    warm = asyncio.run(soak(live.url, "tiny", 200, seed=1, deadline_s=60))
    assert not warm.failures, warm.failures
    wait_drained(live.url)
    baseline = rss_bytes(os.getpid())
    report = asyncio.run(soak(live.url, "tiny", SCHEDULES, seed=16, deadline_s=240))
    assert not report.failures, report.failures
    assert all(report.schedules[k] > SCHEDULES / 10 for k in report.schedules), report.schedules
    assert report.statuses[429] > 0, report.statuses  # the bursts did meet the queue limit
    assert max(report.statuses) < 500
    gauges = wait_drained(live.url)
    assert gauges == {
        "num_requests_running": 0,
        "num_requests_waiting": 0,
        "kv_cache_usage_perc": 0,
    }, gauges
    scheduler = live.engine.engine.scheduler
    assert not scheduler.requests and scheduler.allocator.num_used == 0
    assert live.engine.num_waiting == 0 and live.engine.alive
    assert rss_bytes(os.getpid()) - baseline <= RSS_GROWTH_BOUND
