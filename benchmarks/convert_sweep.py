"""Fidelity of untrained conversions over loops × ranks, as a markdown table for the README.

    python -m benchmarks.convert_sweep --loops 2 3 --ranks 0 64 128 256 full

Each row is one ``model.convert.convert`` of the pulled SmolLM2-135M-Instruct (average init
unless ``--init``), measured on the built-in evaluation text against the source model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from model.build import eval_windows
from model.checkpoint import load_model
from model.config import FULL_RANK, LINEAR_MODULES
from model.convert import convert
from model.fidelity import measure_fidelity
from model.pull import pull_default


def _rank(value: str) -> int:
    return FULL_RANK if value == "full" else int(value)


def _rank_label(ranks: dict[str, int]) -> str:
    """'64', or '256 (k, v: 192)' where some modules were capped at their full rank."""
    top = max(ranks.values())
    capped = [m for m, r in ranks.items() if r < top]
    if not capped:
        return str(top)
    return f"{top} ({', '.join(capped)}: {min(ranks.values())})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loops", type=int, nargs="+", default=[2, 3])
    p.add_argument("--ranks", type=_rank, nargs="+", default=[0, 64, 128, 256, FULL_RANK])
    p.add_argument("--init", default="average")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_sweep"))
    args = p.parse_args(argv)
    src = pull_default()
    source = load_model(src)
    windows = eval_windows(src)
    rows = []
    plan = [(b, r) for b in args.loops for r in args.ranks]
    for loops, rank in tqdm(plan, desc="conversions"):
        # a rank above a module's full rank (k, v: 192 here) means that module at full rank
        ranks = {
            m: FULL_RANK if rank == FULL_RANK else min(rank, source.config.full_rank(m))
            for m in LINEAR_MODULES
        }
        model, report = convert(source, loops, args.init, ranks, progress=False)
        fid = measure_fidelity(source, model, windows)
        rows.append(
            {
                "loops": loops,
                "init": args.init,
                "rank": "full" if rank == FULL_RANK else _rank_label(report.ranks),
                "params": report.converted_params,
                "source_params": report.source_params,
                "saved": report.saved_fraction,
                "energy_q": report.energy_kept["q"],
                **fid.to_dict(),
            }
        )
    lines = [
        f"Source: SmolLM2-135M-Instruct ({rows[0]['source_params']:,} parameters), perplexity "
        f"{rows[0]['source_ppl']:.2f} on the built-in evaluation text ({rows[0]['tokens']} "
        f"tokens); {time.strftime('%Y-%m-%d', time.gmtime())}, "
        "`python -m benchmarks.convert_sweep`.",
        "",
        "| loops | init | rank | parameters | saved | energy kept (q) | perplexity | KL (nats) "
        "| top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loops']} | {r['init']} | {r['rank']} | {r['params']:,} | "
            f"{100 * r['saved']:.1f}% | {100 * r['energy_q']:.1f}% | {r['converted_ppl']:.4g} | "
            f"{r['kl']:.3f} | {100 * r['agreement']:.1f}% |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(table)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
