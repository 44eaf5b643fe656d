"""The conversion's fidelity report as uptraining probes, so a curve starts at its numbers.

``loopserve convert`` reports KL(source ‖ converted), top-1 agreement and perplexity on the
built-in evaluation text and on the held-out self-distilled samples (``model.build``). Logged
at every evaluation of ``loopserve uptrain --eval-fidelity``, the same measurement on the same
windows makes step 0 of the training curve *be* that report, and every later point comparable
with it. Neither set is training data: the training prompts are disjoint from both
(``tests/test_convert_data.py``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.build import eval_windows
from model.calibration_data import heldout_windows
from model.fidelity import measure_fidelity, reference_logprobs
from model.recursive import RecursiveLM
from training.uptrain import Probe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Log keys, as in a conversion's provenance (``loopserve.json``).
BUILTIN, HELDOUT = "fidelity", "fidelity_heldout"


def _fidelity(
    teacher: RecursiveLM, windows: torch.Tensor, reference: list[torch.Tensor], student: RecursiveLM
) -> dict[str, Any]:
    return measure_fidelity(teacher, student, windows, reference=reference).to_dict()


def fidelity_probes(
    teacher: RecursiveLM,
    teacher_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int = 256,
    progress: bool = True,
) -> dict[str, Probe]:
    """Probes ``fidelity`` (built-in text) and ``fidelity_heldout`` (held-out samples, made or
    read from their cache) over windows of ``seq_len``; the teacher's log-probabilities are
    computed once here, not at every evaluation."""
    sets = {
        BUILTIN: eval_windows(teacher_dir, seq_len),
        HELDOUT: heldout_windows(
            teacher, teacher_dir, tokenizer, seq_len=seq_len, progress=progress
        ),
    }
    return {
        name: partial(_fidelity, teacher, windows, reference_logprobs(teacher, windows))
        for name, windows in sets.items()
    }
