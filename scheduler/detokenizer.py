"""Incremental detokenisation with stop strings that may span token boundaries.

Each token costs two decodes of a short window, not a decode of the whole output (which made a
request O(n²)): the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is what the
new tokens add — the window keeps enough context for byte-level BPE, where one character can
take several tokens and a token's leading space depends on its neighbour. A delta that ends in
an incomplete UTF-8 character (U+FFFD) waits for its other tokens. Text is released only once it
can no longer turn out to be part of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class TextDelta:
    text: str
    stopped: bool  # a stop string matched: the request must finish


class IncrementalDetokenizer:
    """Tracks one sequence's decoded text and how much of it has been released."""

    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...], include_stop: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.released = 0
        self._searched = 0
        self._prefix = 0  # ids[prefix:read] is the context the next delta is decoded against
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _append(self, output_ids: list[int], final: bool) -> None:
        """Add the text of the tokens past ``read`` (all of them when ``final``)."""
        if len(output_ids) <= self._read:
            return
        before = self._decode(output_ids[self._prefix : self._read])
        after = self._decode(output_ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(output_ids)

    def update(self, output_ids: list[int], final: bool, check_stop: bool = True) -> TextDelta:
        """New releasable text after ``output_ids`` (all of them so far). ``check_stop`` False
        (before ``min_tokens``, as vLLM does): stop strings in the text so far are passed over
        for good, except where one runs on into text that comes once checks start."""
        self._append(output_ids, final)
        stopped = False
        if self.stop and not check_stop:
            self._searched = len(self.text)
        elif self.stop:
            start = max(0, self._searched - self.holdback)
            hits = [(self.text.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s) if self.include_stop else i]
                stopped = final = True
            self._searched = len(self.text)
        end = len(self.text)
        if not final and self.stop:
            end -= self.holdback
        delta = self.text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return TextDelta(delta, stopped)
