"""Where a decode step's time goes, by kernel family, on the real engine.

Wraps the entry points of each kernel family (packed linear maps, the LM head, paged decode
attention, K/V writes, the pointwise chains) with a wall-clock counter, fills a batch of
``c`` requests with 128-token prompts, and times ``--steps`` steady decode steps. "other" is
the step's remaining time: the Python of the layer loop, the runner and the scheduler. No
profiler runs (its per-op overhead would swamp one-row steps), so the parts add up to the
step as served. As served, all-decode steps run each layer as one C++ call
(``decode_layer``, ``model.fused_layer``); ``--python-layers`` runs the Python layer instead,
which shows the kernels inside a layer one by one.

    python -m benchmarks.step_profile --threads 1 --dtype bfloat16 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gemm_peak import DTYPES
from benchmarks.throughput import git_commit, machine_name, random_models
from model.serving import prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams

seconds: Counter[str] = Counter()
calls: Counter[str] = Counter()


def _timed(fn: Callable[..., Any], key: Callable[..., str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        name = key(*args)
        seconds[name] += time.perf_counter() - start
        calls[name] += 1
        return out

    return wrapper


def instrument() -> None:
    """Count time in each kernel family's entry point (module attributes the callers read)."""
    import loopserve_kernels.packed_linear as packed
    import model.fused_layer as fused_layer

    attention = sys.modules["loopserve_kernels.paged_attention"]
    pointwise = sys.modules["loopserve_kernels.pointwise"]
    for name in ("rms_norm_cpu", "rope_cpu_", "silu_mul_cpu"):
        setattr(pointwise, name, _timed(getattr(pointwise, name), lambda *_, n=name: n))
    for name in ("paged_decode_cpu", "prefill_chunks_cpu", "write_kv_ref", "write_kv_cpu"):
        setattr(attention, name, _timed(getattr(attention, name), lambda *_, n=name: n))
    fused_layer.decode_layer_cpu = _timed(fused_layer.decode_layer_cpu, lambda *_: "decode_layer")
    packed.PackedWeight.__call__ = _timed(
        packed.PackedWeight.__call__,
        lambda w, *_: "lm_head" if w.out_features > 8 * w.in_features else "linear",
    )


def profile(model: torch.nn.Module, conc: int, steps: int, seed: int) -> dict[str, Any]:
    engine = Engine(
        model,
        EngineConfig(
            batching="sequence",
            max_num_seqs=conc,
            max_num_batched_tokens=max(256, 4 * conc),
            num_blocks=4096,
            block_size=16,
            max_model_len=4096,
        ),
    )
    rng = random.Random(seed)
    # long enough that no request finishes while the last ones are still being admitted (at
    # c = 64 admission takes ~36 steps): the batch stays full for every timed step
    params = SamplingParams(max_tokens=4096 - 128, temperature=0.0, ignore_eos=True)
    for i in range(conc):
        engine.add_request(f"r{i}", [rng.randrange(3, 49000) for _ in range(128)], params)
    sched = engine.scheduler
    while len(sched.running) < conc or not all(r.prefilled for r in sched.running):
        if not engine.has_work:
            raise RuntimeError(f"the batch never filled to {conc} running requests")
        engine.step()
    for _ in range(3):
        engine.step()
    seconds.clear()
    calls.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_ms = (time.perf_counter() - start) / steps * 1e3
    parts = {k: v / steps * 1e3 for k, v in seconds.most_common()}
    parts["other"] = step_ms - sum(parts.values())
    return {"concurrency": conc, "step_ms": step_ms, "parts_ms": parts, "calls": dict(calls)}


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    names = sorted(
        {k for r in rows for k in r["parts_ms"]}, key=lambda k: -rows[-1]["parts_ms"].get(k, 0)
    )
    lines = [
        header,
        "",
        "| c | step ms | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(
            f"{r['parts_ms'].get(k, 0):.2f} ({100 * r['parts_ms'].get(k, 0) / r['step_ms']:.0f}%)"
            for k in names
        )
        lines.append(f"| {r['concurrency']} | {r['step_ms']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/step_profile"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--python-layers",
        action="store_true",
        help="run every layer through the Python layer (kernel by kernel), not the one-call "
        "C++ decode layer: the breakdown inside a layer",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    instrument()
    model = random_models()["vanilla"].to(DTYPES[args.dtype])
    prepare_for_serving(model)
    if args.python_layers:
        model.decode_layer = None
    rows = [profile(model, c, args.steps, args.seed) for c in args.concurrency]
    header = (
        f"### Decode step by kernel family — {machine_name()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}, "
        f"SmolLM2-135M shapes (random weights), {args.dtype}, 128-token prompts, "
        f"{'Python layers' if args.python_layers else 'fused decode layer'}, ms per step (share)"
    )
    table = markdown(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.md").write_text(table)
    (args.out / "step_profile.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
