"""Plot the Grafana dashboard's panels (deploy/grafana/loopserve.json) as a PNG from a real
Prometheus scrape of a running loopserve, for places where Grafana itself cannot run.

    loopserve serve --port 8000 &
    python deploy/dashboard_png.py --url http://127.0.0.1:8000 --seconds 120 \
        --out deploy/grafana/dashboard.png

It starts Prometheus on loopback (scraping ``--url`` every second), sends streaming
completions from ``--concurrency`` clients for ``--seconds``, then draws every panel's
queries over the run, evaluated by that Prometheus.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from promstack import Panel, Prometheus, dashboard_panels, run_prometheus

PROMPTS = (
    "Explain what a transformer layer computes.",
    "Write a short poem about the sea.",
    "List three uses of a recursive neural network.",
    "What is the capital of France?",
)

UNITS = {"s": "seconds", "reqps": "requests/s", "percentunit": "fraction of blocks"}


def drive_load(url: str, seconds: float, concurrency: int, max_tokens: int) -> int:
    """Streaming completions from ``concurrency`` threads until ``seconds`` pass; returns
    the number of requests finished."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        model = json.load(r)["data"][0]["id"]
    deadline = time.monotonic() + seconds
    done = [0] * concurrency

    def client(i: int) -> None:
        n = i
        while time.monotonic() < deadline:
            body = {
                "model": model,
                "prompt": PROMPTS[n % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "stream": True,
            }
            req = urllib.request.Request(
                f"{url}/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                for _ in r:
                    pass
            done[i] += 1
            n += concurrency

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def plot(prom: Prometheus, panels: list[Panel], start: float, end: float, out: Path) -> None:
    """One subplot per panel, one line per returned series, like the Grafana dashboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for expr, legend in panel.queries:
            for series in prom.query_range(expr, start, end, step):
                t = [float(ts) - start for ts, _ in series["values"]]
                v = [float(val) for _, val in series["values"]]
                ax.plot(t, v, label=_legend(legend, series["metric"]))
        unit = UNITS.get(panel.unit)
        ax.set_title(f"{panel.title} ({unit})" if unit else panel.title)
        ax.set_xlabel("seconds into the run")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("loopserve dashboard (deploy/grafana/loopserve.json) from a Prometheus scrape")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running loopserve")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the load")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per completion")
    p.add_argument("--out", type=Path, default=Path("dashboard.png"), help="the PNG to write")
    args = p.parse_args()
    target = args.url.split("://", 1)[-1].rstrip("/")
    with tempfile.TemporaryDirectory() as tmp, run_prometheus(target, Path(tmp)) as prom:
        prom.wait_for_samples('up{job="loopserve"} == 1', timeout=30)
        start = time.time()
        n = drive_load(args.url, args.seconds, args.concurrency, args.max_tokens)
        time.sleep(3)  # the last scrapes
        plot(prom, dashboard_panels(), start - 5, time.time(), args.out)
    print(f"{n} requests in {args.seconds:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
