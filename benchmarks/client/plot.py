"""One PNG per run: CDFs of TTFT, TPOT, ITL and end-to-end latency, and every inter-token
gap against the time it happened (stalls and batching hiccups show up as spikes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.client.metrics import RequestResult


def plot_run(results: list[RequestResult], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    series = {
        "TTFT": [r.ttft for r in ok],
        "TPOT": [r.tpot for r in ok if r.output_len > 1],
        "ITL": [g for r in ok for g in r.itl],
        "E2E latency": [r.latency for r in ok],
    }
    fig, (cdf, itl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, seconds in series.items():
        if seconds:
            ms = np.sort(np.asarray(seconds)) * 1000
            cdf.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", label=name)
    cdf.set(xscale="log", xlabel="ms", ylabel="fraction of samples", title="latency CDFs")
    cdf.legend()
    cdf.grid(alpha=0.3)
    for r in ok:
        at = r.start + r.ttft + np.cumsum(r.itl)  # when each later token arrived
        itl.scatter(at, np.asarray(r.itl) * 1000, s=4, alpha=0.5)
    itl.set(xlabel="seconds since start", ylabel="inter-token latency (ms)", title="ITL over time")
    itl.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
