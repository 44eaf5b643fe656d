"""The depth-wise scheduler: which rows run in the next pass of the block.

Each running request has at most one in-flight work item (a prefill chunk or a decode
token) that advances one loop per step in depth mode, or all loops in one step in sequence
mode. Continuing items always run (or, aligned, the largest depth group plus anything held
``loops - 1`` steps); freed capacity is refilled at once by next tokens and new prefill chunks,
FCFS, within ``max_num_batched_tokens`` and ``max_num_seqs``. When KV blocks run out the newest
running request is preempted and later recomputed.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from scheduler.block_allocator import BlockAllocator
from scheduler.config import EngineConfig
from scheduler.prefix_cache import PrefixCache, block_keys
from scheduler.request import FinishReason, Request, Status, WorkItem
from scheduler.sampling import SampleResult, SamplingParams, TokenContext
from scheduler.structured import GrammarState


class RequestRejected(ValueError):
    """A request the engine can never serve (too long for the context or the KV pool)."""


@dataclass(frozen=True)
class NewRequest:
    """A request the runner has not seen since it was (re)started: its settings, sent once."""

    request_id: str
    params: SamplingParams
    exit_thresholds: tuple[float, ...]  # per depth
    min_loops: int


@dataclass(frozen=True)
class NewBlocks:
    """KV blocks a request gained since the last step: ``blocks[d]`` continues its depth-d
    table at index ``start``."""

    request_id: str
    start: int
    blocks: tuple[tuple[int, ...], ...]


@dataclass
class ScheduledItem:
    """One request's rows in this step: plain data the runner turns into tensors. Only an
    item at loop 0 carries its tokens (deeper ones continue from the runner's hidden rows)."""

    request_id: str
    start: int
    num_tokens: int
    depth: int
    decode: bool
    needs_logits: bool
    output_index: int
    token_ids: list[int] = field(default_factory=list)
    context: TokenContext | None = None  # only for rows with penalties or min-token bans
    grammar: GrammarState | None = None  # only for rows with a structured output


@dataclass
class SchedulerOutput:
    """One step: the items to run, and what changed for the runner's persistent row state
    since the last step (in this order: ``dropped``, then ``new_requests``, then
    ``new_blocks``) — never every request's tables or settings."""

    items: list[ScheduledItem]
    dropped: list[str] = field(default_factory=list)  # requests whose runner state is stale
    new_requests: list[NewRequest] = field(default_factory=list)
    new_blocks: list[NewBlocks] = field(default_factory=list)
    whole_tokens: bool = False
    """Aligned, and every item at loop 0: the runner may run all loops in this one step where
    no item can exit before the last — nothing could leave between loops, and a newcomer would
    be held until the group is back at loop 0 anyway, so per-loop steps would only add each
    step's fixed costs (scheduling, step inputs, the engine loop's wake-ups)."""

    @property
    def num_rows(self) -> int:
        return sum(i.num_tokens for i in self.items)


@dataclass
class ItemResult:
    """What the runner did for one item: the token it sampled (if the item ended with one), and
    whether the item goes on to the next loop — the runner's rule, the scheduler follows it."""

    sample: SampleResult | None = None
    exit_depth: int | None = None
    continues: bool = False


@dataclass
class TokenEvent:
    """A token emitted for a request, and whether that finished it."""

    request_id: str
    sample: SampleResult
    exit_depth: int
    finish_reason: FinishReason | None


class Scheduler:
    """Owns the request queues and the KV block allocator; knows no tensors."""

    def __init__(
        self,
        config: EngineConfig,
        loops: int,
        eos_token_ids: tuple[int, ...],
        aligned: bool = False,
    ) -> None:
        self.config = config
        self.loops = loops
        self.aligned = aligned
        self.eos_token_ids = set(eos_token_ids)
        self.exit_thresholds = config.thresholds_for(loops)
        self.allocator = BlockAllocator(config.num_blocks)
        self.prefix_cache = (
            PrefixCache(self.allocator, config.block_size) if config.enable_prefix_caching else None
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # samples 1..n-1 of a request wait here until sample 0 has prefilled (and cached) the
        # prompt they share; then they join the queue's front
        self._followers: dict[str, list[Request]] = {}
        self.num_preemptions = 0
        self._dropped: list[str] = []
        # request id -> blocks per depth the runner has been sent (absent: it knows none)
        self._sent_blocks: dict[str, int] = {}

    # -- admission -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        follows: str | None = None,
    ) -> Request:
        """Queue a request; with ``follows`` (prefix caching), hold it until that request has
        computed the prompt both start with."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise RequestRejected("the prompt is empty")
        limit = self.config.max_model_len
        if len(prompt_ids) >= limit:
            raise RequestRejected(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length "
                f"is {limit} tokens including at least one generated token"
            )
        longest = min(len(prompt_ids) + params.max_tokens, limit)
        need = self.loops * math.ceil(longest / self.config.block_size)
        if need > self.config.num_blocks:
            raise RequestRejected(
                f"prompt + max_tokens = {longest} tokens need {need} KV blocks, more than the "
                f"cache holds ({self.config.num_blocks}); lower max_tokens or the prompt"
            )
        req = Request(request_id, list(prompt_ids), params, time.monotonic(), self.loops)
        self.requests[request_id] = req
        leader = self.requests.get(follows) if follows is not None else None
        if leader is not None and not leader.finished and not leader.prefilled:
            self._followers.setdefault(leader.request_id, []).append(req)
        else:
            self.waiting.append(req)
        return req

    def _release_followers(self, leader: Request) -> None:
        for req in reversed(self._followers.pop(leader.request_id, [])):
            if not req.finished:
                self.waiting.appendleft(req)

    @property
    def num_waiting(self) -> int:
        """Sequences queued, including samples held for their leader's prefill."""
        return len(self.waiting) + sum(len(f) for f in self._followers.values())

    def abort(self, request_id: str) -> bool:
        """Finish a request early (client gone); its blocks return to the pool at once."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, FinishReason.ABORT)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        for req in self.running:
            if req.item is not None:
                budget -= req.item.num_tokens
        for req in list(self.running):
            if req.item is None and req.status is Status.RUNNING and budget > 0:
                budget -= self._start_item(req, budget)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._start_item(req, budget):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.first_scheduled = req.first_scheduled or time.monotonic()
            self.running.append(req)
            budget -= req.item.num_tokens
        ready = [r for r in self.running if r.item is not None]
        if self.aligned and ready:
            ready = self._align(ready)
        items = [self._describe(r) for r in ready]
        dropped, self._dropped = self._dropped, []
        new_requests, new_blocks = self._changes(dropped)
        whole = self.aligned and all(i.depth == 0 for i in items)
        return SchedulerOutput(items, dropped, new_requests, new_blocks, whole)

    def _changes(self, dropped: list[str]) -> tuple[list[NewRequest], list[NewBlocks]]:
        """What the runner's row state lacks: requests it does not know (new, or restarted
        after a preemption dropped them) and the blocks each running request gained."""
        for rid in dropped:
            self._sent_blocks.pop(rid, None)
        new_requests, new_blocks = [], []
        for req in self.running:
            rid = req.request_id
            sent = self._sent_blocks.get(rid)
            if sent is None:
                new_requests.append(self._settings(req))
                sent = 0
            have = len(req.block_tables[0])
            if have > sent:
                tables = tuple(tuple(t[sent:]) for t in req.block_tables)
                new_blocks.append(NewBlocks(rid, sent, tables))
            self._sent_blocks[rid] = have
        return new_requests, new_blocks

    def _settings(self, req: Request) -> NewRequest:
        p = req.params
        thresholds = (
            self.exit_thresholds if p.exit_threshold is None else (p.exit_threshold,) * self.loops
        )
        min_loops = self.config.min_loops if p.min_loops is None else p.min_loops
        return NewRequest(req.request_id, p, thresholds, min_loops)

    def _align(self, ready: list[Request]) -> list[Request]:
        """The items at the depth most items are at (ties: the deepest, whose tokens are
        nearest), plus any item already held ``loops - 1`` steps; the rest wait a step.

        Staggered rows merge within ``loops - 1`` steps: the group that runs moves onto the
        next depth and collects the rows waiting there.
        """
        sizes = Counter(r.item.depth for r in ready if r.item is not None)
        depth = max(sizes, key=lambda d: (sizes[d], d))
        chosen = []
        for r in ready:
            assert r.item is not None
            if r.item.depth == depth or r.item.held >= self.loops - 1:
                r.item.held = 0
                chosen.append(r)
            else:
                r.item.held += 1
        return chosen

    def _start_item(self, req: Request, budget: int) -> int:
        """Give ``req`` its next work item if KV blocks allow; returns its size (0: none)."""
        target = req.num_tokens  # KV is needed for every known token; the last one yields logits
        if req.num_computed == 0 and not req.block_tables[0]:
            self._reuse_prefix(req)
        n = 1 if req.prefilled else min(target - req.num_computed, budget)
        end = req.num_computed + n
        while not self._reserve(req, end):
            victim = self.running[-1] if self.running else None
            if victim is None or victim is req or req.status is Status.WAITING:
                if req.status is Status.RUNNING:
                    self._preempt(req)
                return 0
            self._preempt(victim)
        req.item = WorkItem(
            start=req.num_computed,
            num_tokens=n,
            depth=0,
            decode=req.prefilled,
            needs_logits=end == target,
        )
        return n

    def _reuse_prefix(self, req: Request) -> None:
        """Start a (re)computed request on the cached blocks of its prompt's longest cached
        prefix; the last known token is always computed (it yields the logits)."""
        if self.prefix_cache is None:
            return
        bs = self.config.block_size
        if req.block_keys is None:
            req.block_keys = block_keys(req.prompt_ids, bs)
        limit = (req.num_tokens - 1) // bs
        found = self.prefix_cache.match(req.block_keys, limit, len(req.prompt_ids))
        for blocks in found:
            for table, block in zip(req.block_tables, blocks, strict=True):
                table.append(block)
        req.cached_blocks = len(found)
        req.num_computed = req.cached_tokens = len(found) * bs

    def _cache_prompt(self, req: Request) -> None:
        """Offer the prompt blocks whose K/V are now complete at every depth to the cache."""
        if self.prefix_cache is None or req.block_keys is None:
            return
        full = min(req.num_computed, len(req.prompt_ids)) // self.config.block_size
        for i in range(req.cached_blocks, full):
            self.prefix_cache.insert(req.block_keys[i], tuple(t[i] for t in req.block_tables))
        req.cached_blocks = max(req.cached_blocks, full)

    def _allocate(self, n: int) -> list[int] | None:
        """``n`` blocks, evicting cached prefixes nobody runs on before giving up."""
        blocks = self.allocator.allocate(n)
        while blocks is None and self.prefix_cache is not None and self.prefix_cache.evict():
            blocks = self.allocator.allocate(n)
        return blocks

    def _reserve(self, req: Request, end: int) -> bool:
        """Blocks for positions [0, end) at every depth, all or nothing."""
        per_depth = math.ceil(end / self.config.block_size) - len(req.block_tables[0])
        if per_depth <= 0:
            return True
        blocks = self._allocate(per_depth * self.loops)
        if blocks is None:
            return False
        for d, table in enumerate(req.block_tables):
            table.extend(blocks[d * per_depth : (d + 1) * per_depth])
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute later: drop all KV and in-flight work, requeue at the front."""
        self.allocator.free(req.release_blocks())
        self.running.remove(req)
        req.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self._dropped.append(req.request_id)

    def _describe(self, req: Request) -> ScheduledItem:
        item = req.item
        assert item is not None
        return ScheduledItem(
            request_id=req.request_id,
            start=item.start,
            num_tokens=item.num_tokens,
            depth=item.depth,
            decode=item.decode,
            needs_logits=item.needs_logits and not item.sampled,
            output_index=len(req.output_ids),
            token_ids=req.token_ids(item.start, item.num_tokens) if item.depth == 0 else [],
            context=self._context(req),
            grammar=req.grammar,
        )

    def _context(self, req: Request) -> TokenContext | None:
        """The sampler's view of a request's tokens, when its parameters need one."""
        p = req.params
        banned: tuple[int, ...] = ()
        if len(req.output_ids) < p.min_tokens:
            eos = () if p.ignore_eos else tuple(self.eos_token_ids)
            banned = eos + p.stop_token_ids
        if not (p.penalised or banned):
            return None
        return TokenContext(req.prompt_ids, req.output_ids, banned)

    # -- results ---------------------------------------------------------------------------

    def update_from_output(
        self, scheduled: SchedulerOutput, results: dict[str, ItemResult]
    ) -> list[TokenEvent]:
        """Advance every scheduled item by the loops it ran; emit the tokens it produced."""
        events: list[TokenEvent] = []
        for s in scheduled.items:
            req = self.requests[s.request_id]
            item = req.item
            if req.finished or item is None:  # aborted while the step ran
                continue
            res = results[s.request_id]
            if res.sample is not None:
                assert res.exit_depth is not None
                item.sampled = True
                events.append(self._emit(req, res.sample, res.exit_depth))
                if req.finished:
                    continue
            if res.continues:
                item.depth += 1
            else:
                req.num_computed = item.start + item.num_tokens
                req.prefilled = item.sampled  # the next item is the one new token
                req.item = None
                self._cache_prompt(req)
                if req.prefilled:
                    self._release_followers(req)
        return events

    def _emit(self, req: Request, sample: SampleResult, exit_depth: int) -> TokenEvent:
        req.output_ids.append(sample.token)
        reason = self._stop_reason(req, sample.token)
        if reason is not None:
            self._finish(req, reason)
        return TokenEvent(req.request_id, sample, exit_depth, reason)

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Finish a running request for a reason found outside (e.g. a stop string)."""
        req = self.requests[request_id]
        if not req.finished:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self._release_followers(req)
        self.allocator.free(req.release_blocks())
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self._dropped.append(req.request_id)

    def pop_finished(self, request_id: str) -> Request:
        """Forget a finished request once its output has been delivered."""
        req = self.requests.pop(request_id)
        if not req.finished:
            raise ValueError(f"request {request_id!r} has not finished")
        return req
