"""Checkpoint-to-checkpoint conversion with its report: what ``loopserve convert`` runs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from model.checkpoint import load_model, read_loopserve_meta, save_checkpoint
from model.convert import ConversionReport, convert
from model.fidelity import Fidelity, chunk_ids, eval_text, measure_fidelity


@dataclass
class ConvertResult:
    out_dir: Path
    report: ConversionReport
    fidelity: Fidelity | None
    seconds: float

    def lines(self) -> list[str]:
        r = self.report
        ranks = ", ".join(f"{m}={v}" for m, v in r.ranks.items())
        energy = ", ".join(f"{m}={100 * v:.1f}%" for m, v in r.energy_kept.items())
        out = [
            f"converted to {r.loops} loops, init={r.init}, ranks: {ranks}",
            f"residual energy kept: {energy}",
            f"parameters: original {r.source_params:,} | recursive {r.converted_params:,} | "
            f"saved {100 * r.saved_fraction:.1f}%",
        ]
        if self.fidelity is not None:
            out.append(f"fidelity: {self.fidelity.summary()}")
        out.append(f"wrote {self.out_dir} in {self.seconds:.1f} s")
        return out


def eval_windows(tokenizer_dir: str | Path, seq_len: int = 256) -> torch.Tensor:
    """The built-in evaluation text tokenised into windows [N, seq_len]."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return chunk_ids(tok(eval_text())["input_ids"], seq_len)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    loops: int,
    init: str,
    ranks: dict[str, int],
    seed: int = 0,
    evaluate: bool = True,
    seq_len: int = 256,
) -> ConvertResult:
    """Load ``src`` (HF or loopserve vanilla), convert, measure fidelity, save to ``out``."""
    start = time.perf_counter()
    source = load_model(src)
    converted, report = convert(source, loops=loops, init=init, ranks=ranks, seed=seed)
    fidelity = measure_fidelity(source, converted, eval_windows(src, seq_len)) if evaluate else None
    provenance = {
        "source": str(Path(src).resolve()),
        "source_provenance": _source_provenance(src),
        "init": init,
        "loops": loops,
        "ranks": report.ranks,
        "seed": seed,
        "energy_kept": report.energy_kept,
        "parameters": {"source": report.source_params, "converted": report.converted_params},
        "fidelity": fidelity.to_dict() if fidelity else None,
    }
    out_dir = save_checkpoint(converted, out, provenance=provenance, tokenizer_from=src)
    return ConvertResult(out_dir, report, fidelity, time.perf_counter() - start)


def _source_provenance(src: str | Path) -> dict | None:
    try:
        return read_loopserve_meta(src).get("provenance")
    except FileNotFoundError:
        return None


def result_dict(result: ConvertResult) -> dict:
    return {
        "out_dir": str(result.out_dir),
        "report": asdict(result.report),
        "fidelity": result.fidelity.to_dict() if result.fidelity else None,
        "seconds": result.seconds,
    }
