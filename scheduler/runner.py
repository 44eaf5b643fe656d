"""Model runner: turns a SchedulerOutput into one pass of the block (or all loops: in sequence
mode, or an aligned step none of whose items can exit early), decides exits, samples, and
fills the KV that exited tokens skipped.

It never sees Request objects; between steps it keeps only the hidden state of each
in-flight item, keyed by request id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loopserve_kernels import cpu_kernel_available, row_max_lse
from model.recursive import RecursiveLM
from scheduler.config import EngineConfig
from scheduler.exit_policy import GATE, confidence, exits, forced_exit_depth, may_exit
from scheduler.kv_cache import KVCache, PagedAttention, attention_metadata, one_depth_attention
from scheduler.sampling import SampledBatch, SampleResult, SamplingParams, sample_batch
from scheduler.scheduler import ItemResult, ScheduledItem, SchedulerOutput
from scheduler.structured import apply_masks


@dataclass
class StepCounts:
    """What one execute() did, per loop depth: rows run, tokens exited, K/V rows filled; and
    host wall seconds per phase (on a GPU: until the phase's last launch, not its end)."""

    rows: list[int]
    exits: list[int]
    fills: list[int]
    phases: dict[str, float] = field(default_factory=dict)
    depths_per_pass: list[int] = field(default_factory=list)  # one entry per block pass

    def timed(self, phase: str, since: float) -> float:
        """Add the time from ``since`` to ``phase``; returns now, the next phase's start."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now


@dataclass
class _Batch:
    items: list[ScheduledItem]
    depths: list[int]
    hidden: torch.Tensor
    positions: torch.Tensor
    depth_rows: torch.Tensor
    bounds: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _HostDraws:
    """A step's exit decisions and draws, copied to the host in one transfer."""

    leaving: list[bool]
    tokens: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None

    def sample(self, j: int, params: SamplingParams) -> SampleResult:
        top = None
        if params.logprobs and self.top_ids is not None and self.top_logprobs is not None:
            n = params.logprobs
            top = list(zip(self.top_ids[j][:n], self.top_logprobs[j][:n], strict=True))
        return SampleResult(token=self.tokens[j], logprob=self.logprobs[j], top_logprobs=top)


def _to_host(leaving: torch.Tensor, drawn: SampledBatch) -> _HostDraws:
    """One device-to-host copy: exit flags, tokens and logprobs packed into a float64 tensor
    (token ids < 2^53 are exact); top-n alternatives, when asked for, ride in the same pack."""
    parts = [
        leaving.double()[:, None],
        drawn.tokens.double()[:, None],
        drawn.logprobs.double()[:, None],
    ]
    k = 0
    if drawn.top_ids is not None and drawn.top_logprobs is not None:
        k = drawn.top_ids.shape[1]
        parts += [drawn.top_ids.double(), drawn.top_logprobs.double()]
    packed = torch.cat(parts, dim=1).cpu().tolist()
    return _HostDraws(
        leaving=[r[0] > 0 for r in packed],
        tokens=[int(r[1]) for r in packed],
        logprobs=[r[2] for r in packed],
        top_ids=[[int(t) for t in r[3 : 3 + k]] for r in packed] if k else None,
        top_logprobs=[r[3 + k :] for r in packed] if k else None,
    )


class ModelRunner:
    def __init__(self, model: RecursiveLM, cache: KVCache, config: EngineConfig, seed: int = 0):
        self.model = model
        self.cache = cache
        self.config = config
        self.loops = model.config.loops
        self.device = model.device
        self.scale = model.config.arch.head_dim**-0.5
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.hidden: dict[str, torch.Tensor] = {}
        if config.exit_measure == GATE and model.exit_heads is None:
            raise ValueError("exit measure 'gate' needs a checkpoint with learned exit heads")
        if self.device.type == "cpu":
            cpu_kernel_available()  # build (or load) the C++ kernels now, not in the first step

    def forget(self, request_id: str) -> None:
        """Drop a request's in-flight hidden rows (it was aborted)."""
        self.hidden.pop(request_id, None)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, sequence_mode: bool
    ) -> tuple[dict[str, ItemResult], StepCounts]:
        for rid in out.dropped:
            self.forget(rid)
        counts = StepCounts([0] * self.loops, [0] * self.loops, [0] * self.loops)
        results = {i.request_id: ItemResult() for i in out.items}
        if not out.items:
            return results, counts
        t = time.perf_counter()
        # rows sorted by depth: one depth segment per tile in the fused LoRA kernels
        batch = self._build(sorted(out.items, key=lambda i: i.depth))
        t = counts.timed("build", t)
        every_loop = sequence_mode or (out.whole_tokens and not self._may_leave_early(out))
        for _ in range(self.loops if every_loop else 1):
            self._pass(batch, counts)
            t = counts.timed("block", t)
            self._decide(batch, results, counts, every_loop)
            t = counts.timed("head+exit+sample+fill", t)
            batch.depths = [d + 1 for d in batch.depths]
            batch.depth_rows = batch.depth_rows + 1
        if not every_loop:
            self._keep_hidden(batch, results)
        return results, counts

    def _may_leave_early(self, out: SchedulerOutput) -> bool:
        """Whether any item could exit before the last loop (by a forced schedule, or its
        thresholds): then each loop is its own step, so exits free their rows at once."""
        if self.config.forced_exit_weights:
            return True
        last = self.loops - 1
        return any(
            may_exit(d, it.exit_thresholds[d], it.min_loops, last)
            for it in out.items
            for d in range(it.depth, last)
        )

    def _build(self, items: list[ScheduledItem]) -> _Batch:
        hidden, positions, depths, bounds = [], [], [], []
        row = 0
        for it in items:
            n = it.num_tokens
            if it.depth == 0:
                ids = torch.tensor(it.token_ids, device=self.device)
                hidden.append(self.model.embed_tokens(ids))
            else:
                hidden.append(self.hidden.pop(it.request_id))
            positions.extend(range(it.start, it.start + n))
            depths.extend([it.depth] * n)
            bounds.append((row, row + n))
            row += n
        batch = _Batch(
            items=items,
            depths=[it.depth for it in items],
            hidden=torch.cat(hidden),
            positions=torch.tensor(positions, device=self.device),
            depth_rows=torch.tensor(depths, device=self.device),
            bounds=bounds,
        )
        if self.model.prefix is not None:
            self._enter(batch)
        return batch

    def _enter(self, batch: _Batch) -> None:
        """Middle-cycle: depth-0 rows through the model's unique first layers (once a token)."""
        segments, rows = [], []
        for it, (lo, hi) in zip(batch.items, batch.bounds, strict=True):
            if it.depth == 0:
                segments.append((it.block_tables[0], it.start, it.num_tokens))
                rows.extend(range(lo, hi))
        if not rows:
            return
        at = torch.tensor(rows, device=self.device)
        attention = one_depth_attention(
            self.cache, self.cache.prefix, segments, self.scale, self.device
        )
        entered = self.model.enter(
            batch.hidden.index_select(0, at), batch.positions.index_select(0, at), attention
        )
        batch.hidden = batch.hidden.index_copy(0, at, entered)

    def _pass(self, batch: _Batch, counts: StepCounts) -> None:
        tables, slots = [], []
        for it, d in zip(batch.items, batch.depths, strict=True):
            tables.append(it.block_tables[d])
            slots.extend(self.cache.slots(it.block_tables[d], it.start, it.num_tokens))
            counts.rows[d] += it.num_tokens
        meta = attention_metadata(
            tables,
            [it.num_tokens for it in batch.items],
            [it.start + it.num_tokens for it in batch.items],
            self.device,
        )
        slot_mapping = torch.tensor(slots, device=self.device, dtype=torch.int64)
        attention = PagedAttention(self.cache, meta, slot_mapping, self.scale)
        # one depth for the whole batch (always in sequence mode): the int fast path skips the
        # per-depth row segmentation in every linear layer
        counts.depths_per_pass.append(len(set(batch.depths)))
        uniform = counts.depths_per_pass[-1] == 1
        depth = batch.depths[0] if uniform else batch.depth_rows
        batch.hidden = self.model.block_forward(batch.hidden, depth, batch.positions, attention)

    def _decide(
        self,
        batch: _Batch,
        results: dict[str, ItemResult],
        counts: StepCounts,
        every_loop: bool,
    ) -> None:
        """For items that ended a loop where they may produce a token: the LM head over those
        rows only, the exit rule and the sampler as batched ops, one host copy for all."""
        last = self.loops - 1
        forced = self.config.forced_exit_weights
        cand: list[tuple[ScheduledItem, int, int]] = []
        for it, d, (_, hi) in zip(batch.items, batch.depths, batch.bounds, strict=True):
            if results[it.request_id].sample is not None or not it.needs_logits:
                continue  # sequence mode: already exited, riding along
            if d < last and not it.decode and self.model.suffix is not None:
                continue  # a prompt's positions all pass the unique last layers at the last loop
            if forced:
                pos = it.start + it.num_tokens - 1
                exit_now = d == last or d == forced_exit_depth(it.request_id, pos, forced)
            else:
                exit_now = d == last or may_exit(d, it.exit_thresholds[d], it.min_loops, last)
            if exit_now:
                cand.append((it, d, hi - 1))
        exit_hidden = self._leave(batch, results, cand)
        gated = self.config.exit_measure == GATE and not forced
        if gated:  # the gate decides first: only rows that leave reach the LM head
            cand = self._gate(exit_hidden, cand)
        if not cand:
            return
        dev = self.device
        rows = torch.tensor([r for _, _, r in cand], device=dev)
        # the exit head of each row's depth (learned, where the checkpoint has them) gives both
        # its exit confidence and its token
        hidden = exit_hidden.index_select(0, rows)
        logits = self.model.exit_logits(hidden, [d for _, d, _ in cand])
        logits = apply_masks(logits, [it.grammar for it, _, _ in cand])  # before the exit rule
        stats = row_max_lse(logits)  # greedy tokens, logprobs and the "prob" confidence
        leaving = torch.ones(len(cand), dtype=torch.bool, device=dev)
        early = [] if forced or gated else [j for j, (_, d, _) in enumerate(cand) if d < last]
        if early:  # confidence only where an exit is possible
            at = torch.tensor(early, device=dev)
            conf = confidence(logits, self.config.exit_measure, stats[1:]).index_select(0, at)
            leaving[at] = self._exit_rule(conf, [cand[j] for j in early])
        drawn = sample_batch(
            logits,
            [it.params for it, _, _ in cand],
            [it.output_index for it, _, _ in cand],
            self.generator,
            contexts=[it.context for it, _, _ in cand],
            max_lse=stats,
        )
        host = _to_host(leaving, drawn)
        fills: list[tuple[ScheduledItem, int, int]] = []
        for j, (it, d, row) in enumerate(cand):
            if not host.leaving[j]:
                continue
            results[it.request_id] = ItemResult(sample=host.sample(j, it.params), exit_depth=d)
            counts.exits[d] += 1
            if d < last and it.decode and not every_loop:
                fills.append((it, d, row))
        if fills:
            self._fill(batch, fills, counts)

    def _leave(
        self,
        batch: _Batch,
        results: dict[str, ItemResult],
        cand: list[tuple[ScheduledItem, int, int]],
    ) -> torch.Tensor:
        """``batch.hidden`` with the rows that may leave now through the model's unique last
        layers (middle-cycle; as it is otherwise): every row of an item at the last loop that
        has not exited (all of a prompt chunk's positions, so later tokens attend to their
        K/V) and each early candidate's row. A candidate that stays rewrites those K/V when
        it leaves; no one reads them before. The block's own state goes on to the next loop."""
        if self.model.suffix is None:
            return batch.hidden
        last = self.loops - 1
        early = {it.request_id for it, d, _ in cand if d < last}  # decode rows: one a token
        segments, rows = [], []
        for it, d, (lo, hi) in zip(batch.items, batch.depths, batch.bounds, strict=True):
            if d == last and results[it.request_id].sample is None:
                segments.append((it.block_tables[0], it.start, it.num_tokens))
                rows.extend(range(lo, hi))
            elif it.request_id in early:
                segments.append((it.block_tables[0], it.start + it.num_tokens - 1, 1))
                rows.append(hi - 1)
        if not rows:
            return batch.hidden
        at = torch.tensor(rows, device=self.device)
        attention = one_depth_attention(
            self.cache, self.cache.suffix, segments, self.scale, self.device
        )
        left = self.model.leave(
            batch.hidden.index_select(0, at), batch.positions.index_select(0, at), attention
        )
        return batch.hidden.index_copy(0, at, left)

    def _exit_rule(
        self, conf: torch.Tensor, cand: list[tuple[ScheduledItem, int, int]]
    ) -> torch.Tensor:
        """``exits`` over early candidates with their confidences [R] -> [R] bool."""
        dev = self.device
        depth = torch.tensor([d for _, d, _ in cand], device=dev)
        thr = torch.tensor([it.exit_thresholds[d] for it, d, _ in cand], device=dev)
        min_loops = torch.tensor([it.min_loops for it, _, _ in cand], device=dev)
        return exits(conf, depth, thr.to(conf.dtype), min_loops, self.loops - 1)

    def _gate(
        self, hidden: torch.Tensor, cand: list[tuple[ScheduledItem, int, int]]
    ) -> list[tuple[ScheduledItem, int, int]]:
        """The candidates that leave by the learned gate's score (~2H FLOPs a row, no
        vocabulary projection), and every last-loop candidate."""
        early = [j for j, (_, d, _) in enumerate(cand) if d < self.loops - 1]
        if not early:
            return cand
        heads = self.model.exit_heads
        assert heads is not None  # checked at construction
        rows = torch.tensor([cand[j][2] for j in early], device=self.device)
        score = heads.gate(hidden.index_select(0, rows), [cand[j][1] for j in early])
        keep = self._exit_rule(score, [cand[j] for j in early]).tolist()
        stay = {j for j, k in zip(early, keep, strict=True) if not k}
        return [c for j, c in enumerate(cand) if j not in stay]

    def _fill(
        self, batch: _Batch, fills: list[tuple[ScheduledItem, int, int]], counts: StepCounts
    ) -> None:
        """K/V of exited tokens at the depths they skipped: propagated or copied."""
        rows, depths, slots, src_slots = [], [], [], []
        for it, d, row in fills:
            pos = it.start + it.num_tokens - 1
            src = self.cache.slots(it.block_tables[d], pos, 1)[0]
            for deeper in range(d + 1, self.loops):
                rows.append(row)
                depths.append(deeper)
                slots.append(self.cache.slots(it.block_tables[deeper], pos, 1)[0])
                src_slots.append(src)
                counts.fills[deeper] += 1
        slot_t = torch.tensor(slots, device=self.device)
        if self.config.kv_fill == "copy":
            src_t = torch.tensor(src_slots, device=self.device)
            for k_layer, v_layer in zip(self.cache.k, self.cache.v, strict=True):
                for t in (k_layer, v_layer):
                    flat = t.view(-1, *t.shape[2:])
                    flat[slot_t] = flat[src_t]
            return
        order = sorted(range(len(rows)), key=depths.__getitem__)  # one slice per depth
        at = torch.tensor([rows[j] for j in order], device=self.device)
        self.model.fill_kv(
            batch.hidden.index_select(0, at),
            torch.tensor([depths[j] for j in order], device=self.device),
            batch.positions.index_select(0, at),
            slot_t[torch.tensor(order, device=self.device)],
            self.cache.k,
            self.cache.v,
        )

    def _keep_hidden(self, batch: _Batch, results: dict[str, ItemResult]) -> None:
        """Depth mode: the one rule for whether an item goes on to the next loop (not after the
        last loop, nor a decode token that exited); those keep their hidden rows."""
        for it, (lo, hi) in zip(batch.items, batch.bounds, strict=True):
            res = results[it.request_id]
            exited = it.decode and res.sample is not None
            if it.depth < self.loops - 1 and not exited:
                res.continues = True
                self.hidden[it.request_id] = batch.hidden[lo:hi]
