"""Structured outputs: a grammar per request, compiled by xgrammar, that masks the logits of
every row it constrains before anything reads them.

The mask is applied in the runner before the exit decision, so a row's confidence is that of
its *constrained* distribution: a token the grammar forces (one allowed id) has confidence 1
and leaves at the first depth it may, with the token full depth would have picked. The
matcher advances only when a token is emitted (a row that loops on keeps its state), so a
continuing row gets the same mask at every depth.

JSON is compact (no whitespace between tokens): a small model let free there can spend its
whole budget on blanks.

xgrammar is imported on first use: a server that never sees a constrained request never loads
it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    import xgrammar

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]


class InvalidGrammar(ValueError):
    """A constraint xgrammar cannot compile (bad schema, regex or EBNF)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: a JSON schema (as JSON text), any JSON
    object, a regex, one of several strings (as a JSON list), or an EBNF grammar."""

    kind: GrammarKind
    value: str = ""
    field: str = "structured_outputs"  # the request field it came from, for error messages


class GrammarState:
    """One sequence's position in its grammar (an xgrammar matcher)."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> None:
        """Advance past an emitted token (the mask allowed it, so it is always accepted)."""
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class GrammarCompiler:
    """Compiles specs for one tokenizer; built on the first constrained request."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids) or None
        )
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def start(self, spec: GrammarSpec) -> GrammarState:
        c = self._compiler
        try:
            if spec.kind == "json":
                compiled = c.compile_json_schema(spec.value, any_whitespace=False)
            elif spec.kind == "json_object":
                compiled = c.compile_builtin_json_grammar()
            elif spec.kind == "regex":
                compiled = c.compile_regex(spec.value)
            elif spec.kind == "choice":
                options = " | ".join(json.dumps(s) for s in json.loads(spec.value))
                compiled = c.compile_grammar(f"root ::= {options}")
            else:
                compiled = c.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as e:
            message = f"cannot compile the {spec.kind} constraint: {e}"
            raise InvalidGrammar(message, spec.field) from None
        return GrammarState(self._xgr.GrammarMatcher(compiled))


def apply_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> torch.Tensor:
    """Logits [R, V] with each constrained row's disallowed ids at -inf (one bitmask for the
    rows that have a grammar; rows without one are untouched). A row whose grammar allows no
    token at all (a vocabulary that cannot spell what it needs) keeps only its stop ids, so the
    sequence ends instead of drawing from an empty distribution."""
    rows = [j for j, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(states), logits.shape[1])
    for j in rows:
        state = states[j]
        assert state is not None
        state.matcher.fill_next_token_bitmask(bitmask, j)
        if not bitmask[j].any():
            one = torch.ones((), dtype=bitmask.dtype)
            for t in state.matcher.stop_token_ids:
                bitmask[j, t // 32] |= one << (t % 32)  # int32 bit 31 wraps to the sign bit
    masked = logits.float().clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device), indices=rows)
    return masked
