"""Training data for uptraining: local text / JSONL files, or text the teacher writes itself.

Everything ends as packed token windows ``[N, seq_len]``: documents are concatenated with an
EOS separator and cut into fixed windows, so no compute is spent on padding. Self-distillation
samples continuations of a built-in, varied prompt set from the teacher (no external data);
the samples are appended to a JSONL cache batch by batch, so an interrupted or resumed run
never regenerates what it already has.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from model.calibration_data import CalibrationError, pack, render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class DataError(ValueError):
    """Training data that cannot be read, parsed or packed; the message names the source."""


def builtin_prompts() -> list[str]:
    """The shipped prompt set: one instruction per line, varied in topic and form."""
    text = resources.files("training").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {directory}: {e}") from e


def _jsonl_document(record: Any, where: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return tokenizer(record["text"])["input_ids"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if not tokenizer.chat_template:
            raise DataError(f"{where}: chat 'messages' need a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    raise DataError(f"{where}: each JSONL record needs a 'text' string or a 'messages' list")


def read_documents(
    paths: Sequence[str | Path], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Token ids per document: a ``.jsonl`` file gives one per line, any other file one."""
    docs: list[list[int]] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"data file {p} does not exist")
        text = p.read_text(encoding="utf-8")
        if p.suffix != ".jsonl":
            docs.append(tokenizer(text)["input_ids"])
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: invalid JSON: {e}") from e
            docs.append(_jsonl_document(record, f"{p}:{n}", tokenizer))
    return docs


def pack_windows(docs: Sequence[Sequence[int]], seq_len: int, sep_id: int | None) -> torch.Tensor:
    """Concatenate documents (``sep_id`` between them) into windows [N, seq_len]; the ragged
    tail is dropped (``model.calibration_data.pack``, with training's error type)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    try:
        return pack([list(d) for d in docs], seq_len, sep_id)
    except CalibrationError as e:
        raise DataError(f"the data is too short: {e}") from e


@dataclass(frozen=True)
class SelfDistillSpec:
    """What the teacher generates; the cache is reused only for an identical spec."""

    teacher: str
    tokens: int
    gen_len: int = 256
    batch_size: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.gen_len <= 0 or self.batch_size <= 0:
            raise DataError(
                "self-distillation needs tokens, gen_len and batch_size > 0, got "
                f"{self.tokens}, {self.gen_len}, {self.batch_size}"
            )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise DataError(
                f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )


def _read_cache(path: Path, spec: SelfDistillSpec) -> list[list[int]]:
    """Whole batches already in the cache; none if it was made for a different spec.

    A torn last line or a partial batch (an interrupted write) is dropped, so generation
    resumes on a batch boundary with that batch's seed.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]) != {"spec": asdict(spec)}:
            return []
    except json.JSONDecodeError:
        return []
    samples: list[list[int]] = []
    for line in lines[1:]:
        try:
            samples.append(json.loads(line)["ids"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    return samples[: len(samples) - len(samples) % spec.batch_size]


def self_distill(
    spec: SelfDistillSpec,
    tokenizer: PreTrainedTokenizerBase,
    cache: str | Path,
    device: str = "cpu",
    progress: bool = True,
) -> list[list[int]]:
    """Prompt + sampled continuation ids from the teacher until ``spec.tokens`` new tokens exist.

    Batch i samples prompts ``i*batch .. (i+1)*batch`` (cycling the set) with seed
    ``spec.seed + i``, so the data is the same whether it was made in one go or resumed.
    Uses transformers' ``generate`` (KV cache, batched, left padding) on the teacher directory.
    """
    from transformers import AutoModelForCausalLM

    path = Path(cache)
    samples = _read_cache(path, spec)
    prompts = [render_prompt(p, tokenizer) for p in builtin_prompts()]
    generated = sum(len(s) - len(prompts[i % len(prompts)]) for i, s in enumerate(samples))
    if generated >= spec.tokens:
        return samples
    teacher_dir = Path(spec.teacher)
    if not (teacher_dir / "config.json").exists():
        raise DataError(
            f"self-distillation generates with transformers and needs a Hugging Face teacher "
            f"directory (config.json); {teacher_dir} has none"
        )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(teacher_dir), local_files_only=True, dtype=dtype
    ).to(device)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps(r) + "\n" for r in [{"spec": asdict(spec)}, *({"ids": s} for s in samples)]
        )
    )
    bar = tqdm(
        total=spec.tokens, initial=generated, desc="self-distill", unit="tok", disable=not progress
    )
    with path.open("a") as f:
        while generated < spec.tokens:
            start = len(samples)
            batch = [prompts[(start + j) % len(prompts)] for j in range(spec.batch_size)]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            torch.manual_seed(spec.seed + start // spec.batch_size)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                    top_k=0,
                    max_new_tokens=spec.gen_len,
                    pad_token_id=pad,
                )
            for p, row in zip(batch, out[:, width:].tolist(), strict=True):
                cont = row[: row.index(eos) + 1] if eos in row else row
                samples.append(p + cont)
                generated += len(cont)
                bar.update(len(cont))
                f.write(json.dumps({"ids": p + cont}) + "\n")
            f.flush()
    bar.close()
    return samples


@dataclass(frozen=True)
class DataConfig:
    """Where training and held-out windows come from.

    Training data: ``files`` (text / JSONL) and/or ``self_distill_tokens`` tokens sampled from
    the teacher. Held-out: ``eval_file`` or, by default, the built-in evaluation text (the one
    conversion fidelity is reported on), at most ``eval_windows`` windows.
    """

    files: tuple[str, ...] = ()
    self_distill_tokens: int = 0
    gen_len: int = 256
    gen_batch_size: int = 32
    gen_temperature: float = 1.0
    gen_top_p: float = 0.95
    seq_len: int = 256
    eval_file: str | None = None
    eval_windows: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.files and self.self_distill_tokens <= 0:
            raise DataError("no training data: give data files and/or self-distillation tokens")
        if self.eval_windows <= 0:
            raise DataError(f"eval_windows must be > 0, got {self.eval_windows}")


def build_windows(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    teacher_dir: str | Path,
    cache: str | Path,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (training, held-out) windows, each [N, seq_len]."""
    from model.fidelity import eval_text

    docs = read_documents(cfg.files, tokenizer)
    if cfg.self_distill_tokens > 0:
        spec = SelfDistillSpec(
            teacher=str(Path(teacher_dir).resolve()),
            tokens=cfg.self_distill_tokens,
            gen_len=cfg.gen_len,
            batch_size=cfg.gen_batch_size,
            temperature=cfg.gen_temperature,
            top_p=cfg.gen_top_p,
            seed=cfg.seed,
        )
        docs += self_distill(spec, tokenizer, cache, device, progress)
    sep = tokenizer.eos_token_id
    train = pack_windows(docs, cfg.seq_len, sep)
    if cfg.eval_file:
        held_out = read_documents([cfg.eval_file], tokenizer)
    else:
        held_out = [tokenizer(eval_text())["input_ids"]]
    return train, pack_windows(held_out, cfg.seq_len, sep)[: cfg.eval_windows]
