"""Checkpoint-to-checkpoint conversion with its report: what ``loopserve convert`` runs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from model.calibration_data import calibration_windows, heldout_windows
from model.checkpoint import CheckpointError, load_model, read_loopserve_meta, save_checkpoint
from model.convert import DATA_METHODS, ConversionReport, convert
from model.fidelity import Fidelity, chunk_ids, eval_text, measure_fidelity
from model.reconstruct import Polish


@dataclass
class ConvertResult:
    """A written conversion: its report, fidelity on the built-in text and on the held-out
    self-distilled set (None without evaluation), and the wall time (all of it)."""

    out_dir: Path
    report: ConversionReport
    fidelity: Fidelity | None
    seconds: float
    fidelity_heldout: Fidelity | None = None

    def lines(self) -> list[str]:
        r = self.report
        ranks = ", ".join(f"{m}={v}" for m, v in r.ranks.items())
        energy = ", ".join(f"{m}={100 * v:.1f}%" for m, v in r.energy_kept.items())
        layout = ""
        if r.prefix_layers or r.suffix_layers:
            layout = f" (middle-cycle: {r.prefix_layers} first, {r.suffix_layers} last unique)"
        out = [
            f"converted to {r.loops} loops{layout}, init={r.init}, deltas={r.method}, "
            f"ranks: {ranks}",
            f"residual energy kept: {energy}",
            f"parameters: original {r.source_params:,} | recursive {r.converted_params:,} | "
            f"saved {100 * r.saved_fraction:.1f}%",
        ]
        if r.effective_params != r.converted_params:
            out.append(
                f"per-position ranks: {r.effective_params:,} parameters at each position's own "
                f"rank; stored zero-padded to the largest rank per module"
            )
        if r.calibration_tokens:
            out.append(f"calibration: {r.calibration_tokens:,} tokens")
        if self.fidelity is not None:
            out.append(f"fidelity: {self.fidelity.summary()}")
        if self.fidelity_heldout is not None:
            out.append(f"fidelity (held-out samples): {self.fidelity_heldout.summary()}")
        out.append(f"wrote {self.out_dir} in {self.seconds:.1f} s")
        return out


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds tokenizer files (self-distillation and evaluation need one)."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json")
    return any((Path(directory) / n).exists() for n in names)


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
    method: str = "plain",
    calibration_file: str | Path | None = None,
    self_distill_tokens: int = 8192,
    position_ranks: dict[int, int] | None = None,
    rank_budget: int | None = None,
    damp: float = 0.01,
    polish: Polish | None = None,
    progress: bool = True,
    prefix_layers: int = 0,
    suffix_layers: int = 0,
) -> ConvertResult:
    """Load ``src`` (HF or loopserve vanilla), convert, measure fidelity, save to ``out``.

    The data-aware methods (and a rank budget) calibrate on ``calibration_file`` or, by
    default, ``self_distill_tokens`` tokens of the source's own samples from the calibration
    prompt set; fidelity is measured on the built-in text and on the held-out samples, which
    come from a prompt set of their own (the evaluation never sees calibration data).
    ``prefix_layers`` / ``suffix_layers``: the middle-cycle layout (``model.convert``).
    """
    start = time.perf_counter()
    source = load_model(src)
    needs_data = method in DATA_METHODS or rank_budget is not None
    if needs_data and not has_tokenizer(src):
        raise CheckpointError(
            f"{src} has no tokenizer: {method!r} deltas calibrate on text (use method 'plain')"
        )
    tok = (
        AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        if needs_data or evaluate
        else None
    )
    calibration = None
    if needs_data:
        calibration = calibration_windows(
            source,
            src,
            tok,
            calibration_file,
            self_distill_tokens,
            seq_len,
            seed,
            progress,
            heldout=evaluate,
        )
    converted, report = convert(
        source,
        loops=loops,
        init=init,
        ranks=ranks,
        seed=seed,
        progress=progress,
        method=method,
        calibration=calibration,
        position_ranks=position_ranks,
        rank_budget=rank_budget,
        damp=damp,
        polish=polish,
        prefix_layers=prefix_layers,
        suffix_layers=suffix_layers,
    )
    fidelity = heldout = None
    if evaluate:
        fidelity = measure_fidelity(source, converted, eval_windows(src, seq_len))
        held = heldout_windows(source, src, tok, seq_len=seq_len, progress=progress)
        heldout = measure_fidelity(source, converted, held)
    provenance = {
        "source": str(Path(src).resolve()),
        "source_provenance": _source_provenance(src),
        "init": init,
        "loops": loops,
        "prefix_layers": prefix_layers,
        "suffix_layers": suffix_layers,
        "method": method,
        "ranks": report.ranks,
        "position_ranks": report.position_ranks,
        "seed": seed,
        "calibration": {
            "file": str(calibration_file) if calibration_file else None,
            "tokens": report.calibration_tokens,
            "damp": damp,
            "polish": asdict(polish) if polish else None,
        },
        "energy_kept": report.energy_kept,
        "parameters": {
            "source": report.source_params,
            "converted": report.converted_params,
            "effective": report.effective_params,
        },
        "fidelity": fidelity.to_dict() if fidelity else None,
        "fidelity_heldout": heldout.to_dict() if heldout else None,
    }
    out_dir = save_checkpoint(converted, out, provenance=provenance, tokenizer_from=src)
    return ConvertResult(out_dir, report, fidelity, time.perf_counter() - start, heldout)


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
        "fidelity_heldout": result.fidelity_heldout.to_dict() if result.fidelity_heldout else None,
        "seconds": result.seconds,
    }
