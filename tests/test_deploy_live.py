"""A real Prometheus (Debian's package) on 127.0.0.1 scrapes a live loopserve on a tiny model:
the generation-token counter arrives through its HTTP API, every query in deploy/ names only
metrics that loopserve exports, and the dashboard plot renders from that Prometheus."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import LiveServer, write_tiny_rrt

from server.settings import ServeSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
sys.path.insert(0, str(DEPLOY))
import dashboard_png  # noqa: E402
import promstack  # noqa: E402

REQUESTS = 3
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = write_tiny_rrt(tmp_path_factory.mktemp("deploy_model"))
    settings = ServeSettings(model=str(model), kv_cache_memory="8MiB", threads=1)
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(
    live: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[promstack.Prometheus]:
    with promstack.run_prometheus(
        f"127.0.0.1:{live.port}", tmp_path_factory.mktemp("prometheus")
    ) as prom:
        yield prom


def exported_series(live: LiveServer) -> set[str]:
    """Every sample name on loopserve's /metrics (with _total, _bucket, ... suffixes)."""
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_prometheus_scrapes_generated_tokens(
    live: LiveServer, prometheus: promstack.Prometheus
) -> None:
    prometheus.wait_for_samples('up{job="loopserve"} == 1', timeout=20)
    for _ in range(REQUESTS):
        r = httpx.post(
            f"{live.url}/v1/completions",
            json={
                "model": live.info.name,
                "prompt": "hello world",
                "max_tokens": MAX_TOKENS,
                "ignore_eos": True,
            },
            timeout=30,
        )
        assert r.status_code == 200, r.text
    expr = f"loopserve:generation_tokens_total >= {REQUESTS * MAX_TOKENS}"
    (sample,) = prometheus.wait_for_samples(expr, timeout=20)
    assert sample["metric"]["model_name"] == live.info.name
    assert sample["metric"]["job"] == "loopserve"
    assert float(sample["value"][1]) == REQUESTS * MAX_TOKENS


def test_queries_name_only_exported_metrics(live: LiveServer) -> None:
    httpx.post(
        f"{live.url}/v1/completions",
        json={"model": live.info.name, "prompt": "the cat", "max_tokens": 2},
        timeout=30,
    ).raise_for_status()
    exported = exported_series(live) | promstack.SCRAPE_SERIES
    for where, expr in promstack.all_expressions().items():
        unknown = promstack.metric_names(expr) - exported
        assert not unknown, f"{where} uses {unknown}, which loopserve does not export"


def test_dashboard_queries_return_data_and_plot(
    live: LiveServer, prometheus: promstack.Prometheus, tmp_path: Path
) -> None:
    prometheus.wait_for_samples("loopserve:generation_tokens_total > 0", timeout=20)
    panels = promstack.dashboard_panels()
    # series born at the first request need two scrapes before rate() has a value
    for expr in (e for p in panels for e, _ in p.queries):
        prometheus.wait_for_samples(expr, timeout=10)
    start = time.time() - 30
    out = tmp_path / "dashboard.png"
    dashboard_png.plot(prometheus, panels, start, time.time(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
