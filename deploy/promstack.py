"""Prometheus on loopback for the deploy checks and the dashboard plot, and the PromQL that
the deploy files hold (Grafana dashboard, alert rules, prometheus-adapter rule).

Used by ``tests/test_deploy_*.py`` and ``deploy/dashboard_png.py``; needs the ``prometheus``
binary (``deploy/tools.sh`` installs it) and, for :func:`metric_names`, ``promql-parser``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "grafana" / "loopserve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ADAPTER = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"
# What Grafana puts for its variables when it runs a panel's query (its rate interval for
# a 1 s scrape over a short range: at least four scrapes, one step more).
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$model_name": ".*"}
# prometheus-adapter's template fields, as it fills them for a pod metric.
ADAPTER_TEMPLATE = {
    "<<.Series>>": "loopserve:num_requests_waiting",
    "<<.LabelMatchers>>": 'namespace="default",pod=~"loopserve-a|loopserve-b"',
    "<<.GroupBy>>": "pod",
}
# Series that Prometheus itself writes for every target, not the target's exporter.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def require_tool(name: str) -> str:
    """Path of a command-line tool; a clear error if it is not installed."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"`{name}` is not installed: run deploy/tools.sh")
    return path


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: list[tuple[str, str]]  # (PromQL with Grafana's variables filled, legend format)


def dashboard_panels(path: Path = DASHBOARD) -> list[Panel]:
    """The dashboard's panels with their queries as Prometheus will receive them."""
    panels = []
    for p in json.loads(path.read_text())["panels"]:
        queries = [(grafana_to_promql(t["expr"]), t.get("legendFormat", "")) for t in p["targets"]]
        panels.append(Panel(p["title"], p["fieldConfig"]["defaults"].get("unit", ""), queries))
    return panels


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def alert_expressions(path: Path = ALERTS) -> dict[str, str]:
    rules = yaml.safe_load(path.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in rules for r in g["rules"]}


def adapter_expressions(path: Path = ADAPTER) -> list[str]:
    """Each custom rule's series and metrics query, templates filled as the adapter does."""
    out = []
    for rule in yaml.safe_load(path.read_text())["rules"]["custom"]:
        query = rule["metricsQuery"]
        for field, value in ADAPTER_TEMPLATE.items():
            query = query.replace(field, value)
        out += [rule["seriesQuery"], query]
    return out


def all_expressions() -> dict[str, str]:
    """Every PromQL expression in deploy/, keyed by where it is."""
    exprs = {f"alert {name}": e for name, e in alert_expressions().items()}
    for panel in dashboard_panels():
        for i, (e, _) in enumerate(panel.queries):
            exprs[f"panel {panel.title!r} query {i}"] = e
    for i, e in enumerate(adapter_expressions()):
        exprs[f"prometheus-adapter query {i}"] = e
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names of the vector selectors in ``expr`` (parsed by promql-parser)."""
    import promql_parser

    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server on 127.0.0.1 whose HTTP API this object queries."""

    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, endpoint: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{query}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus answered {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for_samples(self, expr: str, timeout: float) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result (TimeoutError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not result:
            raise TimeoutError(f"no samples for {expr!r} within {timeout:.0f}s")
        return result


@contextmanager
def run_prometheus(
    target: str, workdir: Path, scrape_interval: str = "1s", startup_timeout: float = 30.0
) -> Iterator[Prometheus]:
    """Run Prometheus on a free loopback port scraping ``target`` (``host:port``) as job
    ``loopserve`` with the alert rules loaded; stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "loopserve", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    cmd = [
        require_tool("prometheus"),
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={address}",
    ]
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://{address}", proc, startup_timeout, workdir / "prometheus.log")
        yield Prometheus(f"http://{address}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"prometheus not ready within {timeout:.0f}s:\n{log.read_text()[-2000:]}")
