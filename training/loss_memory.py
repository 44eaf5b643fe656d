"""Peak memory of the distillation loss, reference against chunked (bytes, not time).

    python -m training.loss_memory [--batch 2 --seq 256 --loops 3 --chunk 128] [--json FILE]

Each variant runs in a fresh child process on SmolLM2-135M's head shapes (hidden 576,
vocabulary 49,152; the loop hidden states and the teacher's final hidden state are random
inputs): forward and backward of the loss only. On the CPU the figure is the rise of the peak
resident set over the set-up's (``ru_maxrss``); on CUDA the allocator's peak over the set-up's
allocation. One [N, S, V] fp32 tensor is printed beside them for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from loopserve_kernels.pointwise import rms_norm
from training.loss import LossWeights, chunked_distill_loss, distill_loss


def _rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def measure(args: argparse.Namespace, chunk: int) -> dict[str, int]:
    """Forward + backward of one loss; peak bytes above the set-up."""
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    n, s, h, v = args.batch, args.seq, args.hidden, args.vocab
    embed = torch.randn(v, h, device=device, generator=gen) * 0.05  # frozen, tied head
    norm = torch.ones(h, device=device, requires_grad=True)
    t_norm = torch.ones(h, device=device)
    states = [
        torch.randn(n, s, h, device=device, generator=gen).requires_grad_(True)
        for _ in range(args.loops)
    ]
    t_hidden = torch.randn(n, s, h, device=device, generator=gen)
    ids = torch.randint(0, v, (n, s), device=device, generator=gen)

    def head(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, norm, 1e-5) @ embed.T

    @torch.no_grad()
    def teacher_head(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, t_norm, 1e-5) @ embed.T

    weights = LossWeights()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    if chunk == 0:
        loss, _ = distill_loss(states, head, teacher_head(t_hidden), ids, weights)
    else:
        flat = t_hidden.flatten(0, 1)
        loss, _ = chunked_distill_loss(
            states, head, [norm], lambda rows: teacher_head(flat[rows]), ids, weights, chunk
        )
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss() - base
    return {"chunk": chunk, "peak_bytes": int(peak), "tokens": n * s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.loss_memory", description=__doc__)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunk", type=int, default=128, help="chunked variant's tokens per chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return 0
    common = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json:
        common = common[: common.index(args.json)] + common[common.index(args.json) + 1 :]
    rows = []
    for chunk in (0, args.chunk):
        cmd = [sys.executable, "-m", "training.loss_memory", *common, "--child", str(chunk)]
        # A fixed mmap threshold: glibc then returns each freed large block at once, so the
        # peak resident set follows what the loss holds, not what the allocator keeps.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    logits = args.batch * args.seq * args.vocab * 4
    print(
        f"[N, S, V] = [{args.batch}, {args.seq}, {args.vocab}] fp32 logits: "
        f"{logits / 2**20:.0f} MiB each; {args.loops} loops + teacher; device {args.device}"
    )
    for row in rows:
        name = "reference (all logits)" if row["chunk"] == 0 else f"chunked ({row['chunk']})"
        print(f"{name:>24}: peak +{row['peak_bytes'] / 2**20:,.0f} MiB")
    if args.json:
        result = {"shape": vars(args) | {"child": None}, "logits_bytes": logits, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
