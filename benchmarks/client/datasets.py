"""Prompts to send: random token sequences from a tokenizer's vocabulary, a JSONL file of
prompts, or a ShareGPT-format JSON file, each with the number of tokens to ask for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ShareGPT filter, as vLLM applies it: drop tiny turns and anything a 2k context cannot hold
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
_LENGTH_FIXES = 4


class BenchError(Exception):
    """A benchmark that cannot run as asked (missing file, bad dataset, no tokenizer)."""


@dataclass(frozen=True)
class SampleRequest:
    """One prompt and its token budget; ``prompt_len`` is 0 where no tokenizer counted it."""

    prompt: str
    prompt_len: int
    output_len: int


def load_tokenizer(path: str) -> Any:
    """A local tokenizer directory (never a hub download)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot load a tokenizer from {path!r}: {e}") from None


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else 0


def _lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform integers in [mean·(1−r), mean·(1+r)], at least 1 (vLLM's random dataset)."""
    if not 0 <= range_ratio < 1:
        raise BenchError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(np.floor(mean * (1 - range_ratio))))
    high = max(low, int(np.ceil(mean * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def random_requests(
    tokenizer: Any,
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    prefix_len: int = 0,
) -> list[SampleRequest]:
    """Random non-special token ids decoded to text; ``prompt_len`` is the re-encoded count.
    With ``prefix_len`` (vLLM's ``--random-prefix-len``) every prompt starts with the same
    ``prefix_len`` random tokens, a shared system prompt for prefix caching to find.

    Decoding then encoding merges or splits tokens (BPE), so the ids are re-encoded and cut
    or topped up a few times to land on the drawn length.
    """
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    ins = _lengths(input_len, range_ratio, n, rng)
    outs = _lengths(output_len, range_ratio, n, rng)
    prefix = rng.choice(vocab, size=prefix_len).tolist() if prefix_len else []
    requests = []
    for own_len, out_len in zip(ins, outs, strict=True):
        in_len = prefix_len + int(own_len)
        ids = prefix + rng.choice(vocab, size=int(own_len)).tolist()
        for _ in range(_LENGTH_FIXES):
            ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)
            if len(ids) == in_len:
                break
            ids = ids[:in_len] + rng.choice(vocab, size=max(0, in_len - len(ids))).tolist()
        text = tokenizer.decode(ids)
        requests.append(SampleRequest(text, _count(tokenizer, text), int(out_len)))
    return requests


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e}") from None


def jsonl_requests(path: str, tokenizer: Any, output_len: int, n: int) -> list[SampleRequest]:
    """Lines of ``{"prompt": ..., "output_len": N?}`` or bare JSON strings; the first ``n``."""
    requests = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{lineno}: not JSON: {e}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompt, out_len = row["prompt"], int(row.get("output_len", output_len))
        elif isinstance(row, str):
            prompt, out_len = row, output_len
        else:
            raise BenchError(f'{path}:{lineno}: want a string or {{"prompt": "..."}}')
        requests.append(SampleRequest(prompt, _count(tokenizer, prompt), out_len))
        if len(requests) == n:
            break
    return requests


def sharegpt_requests(
    path: str, tokenizer: Any, n: int, output_len: int | None, seed: int
) -> list[SampleRequest]:
    """First human turn as the prompt; the reply's token count as the budget unless
    ``output_len`` is given. Shuffled with ``seed``, filtered as vLLM filters."""
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: not JSON: {e}") from None
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    order = np.random.default_rng(seed).permutation(len(convs))
    requests = []
    for i in order:
        prompt, reply = convs[i][0]["value"], convs[i][1]["value"]
        p_len = _count(tokenizer, prompt)
        o_len = output_len if output_len is not None else _count(tokenizer, reply)
        if p_len < SHAREGPT_MIN_LEN or o_len < SHAREGPT_MIN_LEN:
            continue
        if p_len > SHAREGPT_MAX_PROMPT or p_len + o_len > SHAREGPT_MAX_TOTAL:
            continue
        requests.append(SampleRequest(prompt, p_len, o_len))
        if len(requests) == n:
            break
    return requests
