"""A request's life in the engine: its tokens, KV block tables and in-flight work."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from scheduler.sampling import SamplingParams
from scheduler.structured import GrammarState


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client went away, or shutdown


@dataclass
class WorkItem:
    """Positions [start, start + num_tokens) of one request, at loop ``depth`` this step.

    A prefill item (any chunk of the prompt, or a recompute after preemption) runs every loop
    so that all its positions get real K/V; if it covers the last known token it samples the
    next one, possibly early (``sampled``), and rides on. A decode item (one sampled token)
    leaves the loop when it samples.
    """

    start: int
    num_tokens: int
    depth: int
    decode: bool
    needs_logits: bool
    sampled: bool = False
    held: int = 0  # consecutive steps an aligned schedule has left this item waiting


@dataclass
class Request:
    """Engine-side state of one sequence. ``block_tables[d]`` holds its KV blocks at depth d;
    every position below ``num_computed`` has KV at every depth."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    loops: int
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    num_computed: int = 0
    prefilled: bool = False
    item: WorkItem | None = None
    finish_reason: FinishReason | None = None
    first_scheduled: float | None = None
    grammar: GrammarState | None = None  # where its structured output stands
    block_keys: list[bytes] | None = None  # prefix-cache keys of its full prompt blocks
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    cached_blocks: int = 0  # its prompt blocks the prefix cache holds (found or inserted)

    def __post_init__(self) -> None:
        if not self.block_tables:
            self.block_tables = [[] for _ in range(self.loops)]

    def token_ids(self, start: int, n: int) -> list[int]:
        """Tokens at positions [start, start + n) without building prompt + output (hot path:
        a decode step needs one token of a possibly long sequence)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : start - p + n]
        return self.prompt_ids[start : start + n] + self.output_ids[: max(0, start + n - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def blocks(self) -> list[int]:
        return [b for table in self.block_tables for b in table]

    def release_blocks(self) -> list[int]:
        """Forget all KV (preemption or finish) and hand back the block ids to free."""
        blocks = self.blocks()
        self.block_tables = [[] for _ in range(self.loops)]
        self.num_computed = 0
        self.prefilled = False
        self.item = None
        self.cached_blocks = 0
        return blocks
