"""Incremental detokenisation with stop strings that may span token boundaries.

Text is decoded from all output ids each time (robust for byte-level BPE, where one
character can take several tokens) and released only once it can no longer turn out to be
part of a stop string or an incomplete UTF-8 character.
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

    def update(self, output_ids: list[int], final: bool) -> TextDelta:
        """New releasable text after ``output_ids`` (all of them so far)."""
        self.text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        stopped = False
        if self.stop:
            start = max(0, self._searched - self.holdback)
            hits = [(self.text.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s) if self.include_stop else i]
                stopped = final = True
            self._searched = len(self.text)
        end = len(self.text)
        if not final:
            end -= self.holdback if self.stop else 0
            while end > self.released and self.text[end - 1] == "\ufffd":
                end -= 1  # an incomplete multi-byte character: wait for its other tokens
        delta = self.text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return TextDelta(delta, stopped)
