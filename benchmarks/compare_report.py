"""The comparison's outputs: greedy agreement with the reference server, the side-by-side
markdown table and the sweep plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class SweepResult(Protocol):
    name: str
    command: str | None
    url: str
    rows: list[dict[str, Any]]


def agreement(reference: list[str], texts: list[str], tokenizer: Any) -> dict[str, float]:
    """How far greedy outputs match the reference's on the same prompts: the share of exact
    matches, and the mean share of tokens up to the first difference (of the longer output).

    Texts are re-tokenized with one tokenizer, so peers with other tokenizers compare fairly.
    """
    if not reference:
        return {"agreement_exact": 0.0, "agreement_prefix": 0.0}
    exact = prefix = 0.0
    for ref, text in zip(reference, texts, strict=True):
        a = tokenizer.encode(ref, add_special_tokens=False)
        b = tokenizer.encode(text, add_special_tokens=False)
        same = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        exact += a == b
        prefix += same / max(len(a), len(b)) if a or b else 1.0
    return {"agreement_exact": exact / len(reference), "agreement_prefix": prefix / len(reference)}


_COLUMNS = (
    ("concurrency", "c", "{}"),
    ("completed", "ok", "{}"),
    ("failed", "failed", "{}"),
    ("request_throughput", "req/s", "{:.2f}"),
    ("output_throughput", "output tok/s", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("gflops", "GFLOP/s", "{:.1f}"),
    ("peak_share", "of GEMM peak", "{:.0%}"),
    ("agreement_exact", "greedy exact", "{:.0%}"),
    ("agreement_prefix", "greedy prefix", "{:.0%}"),
)


def sweep_table(results: list[SweepResult], settings: str) -> str:
    """One markdown table, a row per (server, concurrency), then how each server ran."""
    head = ["server", *(title for _, title, _ in _COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for row in r.rows:
            cells = [r.name, *(fmt.format(row[key]) for key, _, fmt in _COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Settings: `{settings}`", "", "Servers:", ""]
    lines += [f"- {r.name}: `{r.command or r.url}`" for r in results]
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[SweepResult], path: str | Path) -> None:
    """Output tok/s and TPOT p50 (solid) / p99 (dashed) against concurrency, a line a server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (tput, tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        cs = [row["concurrency"] for row in r.rows]
        tput.plot(cs, [row["output_throughput"] for row in r.rows], marker="o", label=r.name)
        (line,) = tpot.plot(cs, [row["tpot_p50_ms"] for row in r.rows], marker="o", label=r.name)
        tpot.plot(cs, [row["tpot_p99_ms"] for row in r.rows], ls="--", color=line.get_color())
    tput.set(xlabel="concurrency", ylabel="output tok/s", title="throughput")
    tpot.set(xlabel="concurrency", ylabel="ms", title="TPOT p50 (—) / p99 (--)")
    levels = sorted({row["concurrency"] for r in results for row in r.rows})
    for ax in (tput, tpot):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
