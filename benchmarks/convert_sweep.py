"""Fidelity of untrained conversions over delta methods × ranks × loops, for the README.

    python -m benchmarks.convert_sweep --loops 2 3 --ranks 64 128 \\
        --methods plain whitened sequential --extras [--layouts full middle:2:1]

Each row is one ``model.convert.convert`` of the pulled SmolLM2-135M-Instruct (average init),
measured against the source on the built-in evaluation text and on the held-out
self-distilled set (prompts of its own, never calibration data). The data-aware methods
calibrate on the source's own samples from the calibration prompt set. ``--extras`` adds, at
B = 3 and the first rank: position 0 at full rank, a rank budget of the same delta parameters
as the uniform rank, and a bounded polish; ``--rows`` names rows one by one instead (the
README's table: see benchmarks/results/convert_sweep/command.txt). ``--layouts`` crosses the
grid with sharing layouts: ``full`` (the paper's full cycle) or ``middle:P:E`` (the first P and
last E layers unique, the rest folded; L − P − E must divide by B); a row takes one as
``@middle:P:E``. The source is run once per evaluation set.
Conversion wall time is recorded but the machine this ran on may be shared: not a
performance figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from model.build import eval_windows
from model.calibration_data import calibration_windows, heldout_windows
from model.checkpoint import load_model
from model.config import FULL_RANK, LINEAR_MODULES, RecursionConfig
from model.convert import CONVERT_METHODS, convert, delta_parameters, rank_table
from model.fidelity import measure_fidelity, reference_logprobs
from model.pull import SMOLLM2, SOURCES, pull
from model.reconstruct import Polish


def _rank(value: str) -> int:
    return FULL_RANK if value == "full" else int(value)


def _layout(text: str) -> dict:
    """'full' or 'middle:P:E' -> the row's prefix_layers / suffix_layers."""
    parts = text.split(":")
    if parts == ["full"]:
        return {"prefix_layers": 0, "suffix_layers": 0}
    if len(parts) != 3 or parts[0] != "middle" or not all(x.isdigit() for x in parts[1:]):
        raise argparse.ArgumentTypeError(f"a layout is 'full' or 'middle:P:E', got {text!r}")
    return {"prefix_layers": int(parts[1]), "suffix_layers": int(parts[2])}


def _row(text: str) -> dict:
    """'B:method:rank[:extra][@layout]' with extra 'pos0full', 'budget' or 'polishSECONDS'
    and layout as in ``_layout`` (default: full)."""
    text, _, layout = text.partition("@")
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"a row is B:method:rank[:extra][@layout], got {text!r}")
    row: dict = {"loops": int(parts[0]), "method": parts[1], "rank": _rank(parts[2])}
    row |= _layout(layout or "full")
    extra = parts[3] if len(parts) == 4 else ""
    if extra == "pos0full":
        row["position_ranks"] = {0: FULL_RANK}
    elif extra == "budget":
        row["budget"] = True
    elif extra.startswith("polish"):
        row["polish"] = float(extra.removeprefix("polish"))
    elif extra:
        raise argparse.ArgumentTypeError(f"unknown row extra {extra!r}")
    return row


def _plan(args: argparse.Namespace) -> list[dict]:
    if args.rows:
        return args.rows
    rows = [
        {"loops": b, "method": m, "rank": r, **layout}
        for layout in args.layouts
        for b in args.loops
        for r in args.ranks
        for m in args.methods
    ]
    if args.extras:
        seq = {"loops": 3, "method": "sequential", "rank": args.ranks[0], **args.layouts[0]}
        rows += [
            seq | {"position_ranks": {0: FULL_RANK}},
            seq | {"budget": True},
            seq | {"polish": args.polish_seconds},
        ]
    return rows


def _layout_label(row: dict) -> str:
    p, e = row.get("prefix_layers", 0), row.get("suffix_layers", 0)
    return f"middle ({p} + {e} unique)" if p or e else "full"


def _label(row: dict) -> str:
    r = "full" if row["rank"] == FULL_RANK else str(row["rank"])
    if row.get("position_ranks"):
        return f"{r}, position 0 full"
    if row.get("budget"):
        return f"budget = rank {r}"
    return r


def _method_label(row: dict) -> str:
    if row.get("polish"):
        return f"sequential + polish ({row['polish']:.0f} s)"
    return row["method"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loops", type=int, nargs="+", default=[2, 3])
    p.add_argument("--ranks", type=_rank, nargs="+", default=[64, 128])
    p.add_argument("--methods", nargs="+", choices=CONVERT_METHODS, default=list(CONVERT_METHODS))
    p.add_argument("--init", default="average")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--extras", action="store_true", help="rank exception, budget, polish rows")
    p.add_argument(
        "--layouts",
        type=_layout,
        nargs="+",
        default=[_layout("full")],
        help="sharing layouts of the grid: full, middle:P:E (default: full)",
    )
    p.add_argument("--polish-seconds", type=float, default=120.0)
    p.add_argument(
        "--rows",
        type=_row,
        nargs="+",
        help="explicit rows B:method:rank[:pos0full|budget|polishSECONDS][@middle:P:E] instead "
        "of the grid",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--model", choices=sorted(SOURCES), default=SMOLLM2.name, help="the pulled source model"
    )
    p.add_argument("--out", type=Path, help="default: benchmarks/results/convert_sweep[_MODEL]")
    p.add_argument(
        "--render", action="store_true", help="only redraw sweep.md from the run's sweep.json"
    )
    args = p.parse_args(argv)
    if args.out is None:
        tail = "" if args.model == SMOLLM2.name else f"_{args.model}"
        args.out = Path(f"benchmarks/results/convert_sweep{tail}")
    if args.render:
        rows = json.loads((args.out / "sweep.json").read_text())
        (args.out / "sweep.md").write_text(_table(rows, args))
        return 0
    torch.set_num_threads(args.threads)
    src = pull(SOURCES[args.model])
    source = load_model(src)
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    calib = calibration_windows(source, src, tok, tokens=args.calibration_tokens)
    sets = {"builtin": eval_windows(src), "heldout": heldout_windows(source, src, tok)}
    refs = {name: reference_logprobs(source, w) for name, w in sets.items()}
    rows = []
    grams: dict = {}  # the source's input covariances, shared by whitened rows and the budget
    for spec in _plan(args):
        layout = {k: spec.get(k, 0) for k in ("prefix_layers", "suffix_layers")}
        config = source.config.with_recursion(RecursionConfig(loops=spec["loops"], **layout))
        uniform = dict.fromkeys(LINEAR_MODULES, spec["rank"])
        budget = None
        if spec.get("budget"):
            budget = delta_parameters(config, rank_table(config, uniform))
        start = time.perf_counter()
        model, report = convert(
            source,
            spec["loops"],
            args.init,
            uniform,
            progress=False,
            method=spec["method"],
            calibration=None if spec["method"] == "plain" else calib,
            position_ranks=spec.get("position_ranks"),
            rank_budget=budget,
            polish=Polish(steps=200, seconds=spec["polish"]) if spec.get("polish") else None,
            gram_cache=grams,
            **layout,
        )
        seconds = time.perf_counter() - start
        row = {
            "loops": spec["loops"],
            **layout,
            "layout": _layout_label(layout),
            "init": args.init,
            "method": _method_label(spec),
            "rank": _label(spec),
            "params": report.converted_params,
            "effective_params": report.effective_params,
            "source_params": report.source_params,
            "calibration_tokens": report.calibration_tokens,
            "position_ranks": report.position_ranks,
            "energy_kept": report.energy_kept,
            "convert_seconds_shared_machine": seconds,
            "threads": args.threads,
        }
        for name, windows in sets.items():
            row[name] = measure_fidelity(source, model, windows, reference=refs[name]).to_dict()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "position_ranks"}), flush=True)
        table = _table(rows, args)  # rewritten after every row: a cut-short run keeps its rows
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.md").write_text(table)
        (args.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    return 0


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    first = rows[0]
    b, h = first["builtin"], first["heldout"]
    calibrated = max(r["calibration_tokens"] for r in rows)
    lines = [
        f"Source: {args.model} ({first['source_params']:,} parameters); perplexity "
        f"{b['source_ppl']:.2f} on the built-in text ({b['tokens']:,} tokens), "
        f"{h['source_ppl']:.2f} on the held-out samples ({h['tokens']:,} tokens). "
        f"Calibration: {calibrated:,} tokens of the source's own samples (calibration "
        f"prompts). {first['init']} init, no training, {first['threads']} torch thread; "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, "
        "`python -m benchmarks.convert_sweep`. Parameters: what each position's own rank "
        "needs (stored, zero-padded to one rank per module, in brackets where it differs); "
        "conversion time measured on a shared 2-core machine, not a performance figure.",
        "",
        "| layout | B | deltas | rank | parameters (% of original) | KL built-in "
        "| agreement built-in | perplexity built-in | KL held-out | agreement held-out "
        "| perplexity held-out | convert time (shared machine) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = 100 * r["effective_params"] / r["source_params"]
        params = f"{r['effective_params'] / 1e6:.1f} M ({share:.1f} %)"
        if r["effective_params"] != r["params"]:
            params += f" [stored {r['params'] / 1e6:.1f} M]"
        b, h = r["builtin"], r["heldout"]
        lines.append(
            f"| {_layout_label(r)} | {r['loops']} | {r['method']} | {r['rank']} | {params} | "
            f"{b['kl']:.2f} | "
            f"{100 * b['agreement']:.1f} % | {b['converted_ppl']:.4g} | {h['kl']:.2f} | "
            f"{100 * h['agreement']:.1f} % | {h['converted_ppl']:.4g} | "
            f"{r['convert_seconds_shared_machine']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
