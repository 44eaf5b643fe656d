"""Incremental detokenisation with the real SmolLM2 byte-level BPE tokenizer: the released
deltas add up to the whole decode, never release half a character, and stop strings that span
tokens end the text where a full-text search would."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.pull import pull_default
from scheduler.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Plain ASCII, with  double spaces and\nnew lines.",
    "Multi-byte: café, naïve, Ωmega, 東京都, 🙂🚀 and 👩‍👩‍👧 (a ZWJ family) in one line.",
    "Code: def f(x):\n    return x ** 2  # squares\n\n\tTabs too.",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(pull_default()), local_files_only=True)


def _stream(
    tok: PreTrainedTokenizerBase, ids: list[int], stop: tuple[str, ...] = (), min_tokens: int = 0
) -> tuple:
    detok = IncrementalDetokenizer(tok, stop)
    out, stopped = [], False
    for n in range(1, len(ids) + 1):
        delta = detok.update(ids[:n], final=n == len(ids), check_stop=n >= min_tokens)
        assert "\ufffd" not in delta.text or "\ufffd" in tok.decode(ids[:n])
        out.append(delta.text)
        if delta.stopped:
            stopped = True
            break
    return "".join(out), stopped, out


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids) or text.isascii()
    joined, stopped, deltas = _stream(tok, ids)
    assert joined == tok.decode(ids, skip_special_tokens=True) and not stopped
    for n in range(1, len(ids)):  # every prefix released so far is a prefix of the full text
        assert tok.decode(ids[:n]).startswith("".join(deltas[:n]).rstrip("\ufffd"))


@pytest.mark.parametrize(
    ("text", "stop"),
    [(TEXTS[1], "東京"), (TEXTS[1], "🚀 and"), (TEXTS[2], "x ** 2"), (TEXTS[0], "\nnew")],
)
def test_stop_strings_spanning_tokens(tok: PreTrainedTokenizerBase, text: str, stop: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    joined, stopped, _ = _stream(tok, ids, (stop,))
    assert stopped and joined == text[: text.index(stop)]


def test_stop_strings_count_only_from_min_tokens(tok: PreTrainedTokenizerBase) -> None:
    """vLLM's rule: a stop string generated before ``min_tokens`` does not stop the text; the
    next one after it does, and the text then ends where that one starts."""
    text = "one. two. three. four."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    upto = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).count(".") == 2)
    joined, stopped, _ = _stream(tok, ids, (".",), min_tokens=upto + 1)
    assert stopped and joined == "one. two. three"
    assert _stream(tok, ids, (".",))[0] == "one"  # without min_tokens: the first one
