"""Calibration and held-out text for conversion, with no external data.

Data-aware conversion needs the inputs each layer sees on real text (calibration), and its
fidelity report needs text the conversion never saw (held-out). By default both are the
source model's own samples (self-distillation) from two built-in prompt sets of their own,
disjoint from each other, from the uptraining prompts and from the built-in evaluation text.
Samples are cached under ``$LOOPSERVE_HOME/cache/self_distill`` keyed by everything that
determines them, so a second conversion of the same source reuses them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from model.checkpoint import EXIT_HEADS_FILE
from model.fidelity import eval_text
from model.generate import sample_continuations
from model.pull import loopserve_home
from model.recursive import RecursiveLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CALIBRATION_PROMPTS = "calibration_prompts.txt"
HELDOUT_PROMPTS = "heldout_prompts.txt"
HELDOUT_TOKENS = 18 * 256  # packed stream length: 18 windows of 256, 4,590 scored tokens
HELDOUT_SEED = 1000  # no held-out sample shares a seed with calibration either
OVERLAP_WORDS = 13  # a shared run this long is contamination (GPT-3's decontamination n-gram)


class CalibrationError(ValueError):
    """Calibration data that cannot be read or is too short; the message names the source."""


def builtin_prompts(name: str) -> list[str]:
    """One of the shipped prompt sets (``CALIBRATION_PROMPTS`` or ``HELDOUT_PROMPTS``)."""
    text = resources.files("model").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def render_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A prompt as the model sees it when served: chat-templated if the tokenizer has one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def pack(docs: list[list[int]], seq_len: int, sep_id: int | None) -> torch.Tensor:
    """Documents joined by ``sep_id`` and cut into windows [N, seq_len] (ragged tail dropped)."""
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if sep_id is not None and (not doc or doc[-1] != sep_id):
            stream.append(sep_id)
    n = len(stream) // seq_len
    if n == 0:
        raise CalibrationError(f"{len(stream)} tokens are fewer than one window of {seq_len}")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def read_calibration_file(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, evaluation: dict[str, list[str]]
) -> list[list[int]]:
    """Token ids per document: a ``.jsonl`` file ({"text"} or {"messages"} per line) gives one
    per line, any other file is one text document.

    A document sharing a run of ``OVERLAP_WORDS`` words with a text of ``evaluation`` (set
    name -> its texts) is refused: calibrating on an evaluation set makes its fidelity
    figures a measure of memorisation.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist")
    index = _runs_index(evaluation)
    text = p.read_text(encoding="utf-8")
    if p.suffix != ".jsonl":
        _refuse_overlap(text, index, str(p))
        return [tokenizer(text)["input_ids"]]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{p}:{n}: invalid JSON: {e}") from e
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            _refuse_overlap(rec["text"], index, f"{p}:{n}")
            docs.append(tokenizer(rec["text"])["input_ids"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            contents = [str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict)]
            _refuse_overlap("\n".join(contents), index, f"{p}:{n}")
            chat = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
            docs.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
        else:
            raise CalibrationError(f"{p}:{n}: each record needs a 'text' or 'messages' field")
    return docs


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _runs(words: list[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + OVERLAP_WORDS]) for i in range(len(words) - OVERLAP_WORDS + 1)]


def _runs_index(evaluation: dict[str, list[str]]) -> dict[tuple[str, ...], str]:
    """Every ``OVERLAP_WORDS``-word run of the evaluation texts -> its set's name."""
    return {
        run: name for name, texts in evaluation.items() for t in texts for run in _runs(_words(t))
    }


def shared_runs(texts: list[str], reference: list[str]) -> int:
    """How many ``OVERLAP_WORDS``-word runs of ``texts`` occur in ``reference``: 0 is the
    disjointness the contamination check asks of calibration data."""
    index = _runs_index({"reference": reference})
    return sum(run in index for t in texts for run in _runs(_words(t)))


def _refuse_overlap(text: str, index: dict[tuple[str, ...], str], where: str) -> None:
    """Words, not tokens: a chat template's own tokens would match every chat sample."""
    for run in _runs(_words(text)):
        if run in index:
            raise CalibrationError(
                f"{where}: the calibration document shares {OVERLAP_WORDS} words with "
                f'{index[run]} ("{" ".join(run)}"); calibration data must not overlap an '
                "evaluation set"
            )


@dataclass(frozen=True)
class SampleSpec:
    """Everything that determines a self-distilled set (the cache key)."""

    source: str  # resolved source directory
    weights: str  # size and mtime of its weight files: a rewritten source is resampled
    prompts: str  # which prompt set
    prompts_sha: str
    tokens: int  # packed-stream tokens to reach (prompts + samples + separators)
    gen_len: int = 192
    batch_size: int = 16
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _weights_signature(src: Path) -> str:
    # exit heads do not change what the model samples (every loop runs): calibration that
    # writes them keeps its samples
    files = sorted(f for f in src.glob("*.safetensors") if f.name != EXIT_HEADS_FILE)
    return ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def self_distilled(
    source: RecursiveLM,
    src_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    prompts_name: str,
    tokens: int,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Prompt + sampled continuation ids from ``source`` until the packed stream (one EOS
    between documents) has ``tokens`` tokens; batch j samples the next 16 prompts of the set
    (cycling) with seed + j."""
    if tokens <= 0:
        raise CalibrationError(f"self-distillation needs tokens > 0, got {tokens}")
    prompts = builtin_prompts(prompts_name)
    spec = SampleSpec(
        source=str(Path(src_dir).resolve()),
        weights=_weights_signature(Path(src_dir)),
        prompts=prompts_name,
        prompts_sha=hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        tokens=tokens,
        seed=seed,
    )
    cache = (cache_dir or loopserve_home() / "cache" / "self_distill") / f"{spec.key()}.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("spec") == asdict(spec):
            return data["samples"]
    eos = tuple(source.config.arch.eos_token_id) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    )
    rendered = [render_prompt(p, tokenizer) for p in prompts]
    samples: list[list[int]] = []
    total = 0
    bar = tqdm(total=tokens, desc=f"self-distil {prompts_name}", unit="tok", disable=not progress)
    while total < tokens:
        # batch j: the next batch_size prompts (cycling the set), seed + j
        j = len(samples) // spec.batch_size
        batch = [rendered[(len(samples) + i) % len(rendered)] for i in range(spec.batch_size)]
        gen = torch.Generator().manual_seed(seed + j)
        conts = sample_continuations(
            source, batch, spec.gen_len, gen, spec.temperature, spec.top_p, eos
        )
        for prompt, cont in zip(batch, conts, strict=True):
            if total >= tokens:
                break
            samples.append(prompt + cont)
            added = len(prompt) + len(cont) + (0 if cont and cont[-1] in eos else 1)
            total += added
            bar.update(added)
    bar.close()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".partial")
    tmp.write_text(json.dumps({"spec": asdict(spec), "samples": samples}))
    tmp.rename(cache)
    return samples


def sep_id(source: RecursiveLM, tokenizer: PreTrainedTokenizerBase) -> int | None:
    eos = source.config.arch.eos_token_id
    return eos[0] if eos else tokenizer.eos_token_id


def calibration_windows(
    source: RecursiveLM,
    src_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    file: str | Path | None = None,
    tokens: int = 8192,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = True,
    heldout: bool = True,
) -> torch.Tensor:
    """Calibration windows [N, seq_len]: from ``file`` if given, else ``tokens`` tokens
    self-distilled from the calibration prompt set (never the evaluation texts).

    A file must not overlap the built-in evaluation text, nor the held-out set where
    ``heldout`` (the held-out set is then sampled, or read from its cache, first).
    """
    if file is not None:
        evaluation = {"the built-in evaluation text": [eval_text()]}
        if heldout:
            samples = heldout_samples(source, src_dir, tokenizer, progress=progress)
            evaluation["the held-out set"] = [
                tokenizer.decode(s, skip_special_tokens=True) for s in samples
            ]
        docs = read_calibration_file(file, tokenizer, evaluation)
    else:
        docs = self_distilled(
            source, src_dir, tokenizer, CALIBRATION_PROMPTS, tokens, seed, progress=progress
        )
    return pack(docs, seq_len, sep_id(source, tokenizer))


def heldout_samples(
    source: RecursiveLM,
    src_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    tokens: int = HELDOUT_TOKENS,
    progress: bool = True,
) -> list[list[int]]:
    """The source's samples from the held-out prompt set: the second evaluation set."""
    return self_distilled(
        source, src_dir, tokenizer, HELDOUT_PROMPTS, tokens, HELDOUT_SEED, progress=progress
    )


def heldout_windows(
    source: RecursiveLM,
    src_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    tokens: int = HELDOUT_TOKENS,
    seq_len: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """The second held-out evaluation set [N, seq_len] (:func:`heldout_samples`, packed)."""
    docs = heldout_samples(source, src_dir, tokenizer, tokens, progress)
    return pack(docs, seq_len, sep_id(source, tokenizer))
