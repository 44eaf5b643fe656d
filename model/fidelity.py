"""Fidelity of a converted model to its source on a fixed evaluation text.

Reports perplexity of both, mean KL(source ‖ converted) per token, and top-1 agreement —
the numbers that say whether a conversion still answers like the original.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from model.recursive import RecursiveLM


@dataclass
class Fidelity:
    """Quality of ``converted`` measured against ``source`` over ``tokens`` positions."""

    tokens: int
    source_ppl: float
    converted_ppl: float
    kl: float
    agreement: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"perplexity source {self.source_ppl:.2f} | converted {self.converted_ppl:.4g} | "
            f"KL(source||converted) {self.kl:.4f} nats | top-1 agreement "
            f"{100 * self.agreement:.1f}% over {self.tokens} tokens"
        )


def eval_text() -> str:
    """The built-in English evaluation text shipped with the package."""
    return resources.files("model").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def chunk_ids(ids: list[int], seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] (the ragged tail is dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def reference_logprobs(source: RecursiveLM, windows: torch.Tensor) -> list[torch.Tensor]:
    """The source's next-token log-probabilities per window (float32 [S−1, V] each), to
    measure many conversions against one source without rerunning it."""
    return [
        source(row[None].to(source.device))[0, :-1].double().log_softmax(-1).float().cpu()
        for row in windows
    ]


@torch.no_grad()
def measure_fidelity(
    source: RecursiveLM,
    converted: RecursiveLM,
    windows: torch.Tensor,
    num_loops: int | None = None,
    reference: list[torch.Tensor] | None = None,
) -> Fidelity:
    """Compare next-token distributions of both models on ``windows`` [N, S]; ``reference``
    (from :func:`reference_logprobs` on the same windows) stands in for running the source."""
    nll_s = nll_c = kl = agree = 0.0
    count = 0
    for i, row in enumerate(windows):
        ids = row[None].to(source.device)
        if reference is None:
            ls = source(ids)[0, :-1].double().log_softmax(-1)
        else:
            ls = reference[i].to(source.device).double()
        lc = converted(ids.to(converted.device), num_loops)[0, :-1].double().log_softmax(-1)
        lc = lc.to(ls.device)
        target = ids[0, 1:]
        nll_s += float(F.nll_loss(ls, target, reduction="sum"))
        nll_c += float(F.nll_loss(lc, target, reduction="sum"))
        kl += float((ls.exp() * (ls - lc)).sum())
        agree += float((ls.argmax(-1) == lc.argmax(-1)).sum())
        count += target.numel()
    return Fidelity(
        tokens=count,
        source_ppl=float(torch.tensor(nll_s / count).exp()),
        converted_ppl=float(torch.tensor(nll_c / count).exp()),
        kl=kl / count,
        agreement=agree / count,
    )
