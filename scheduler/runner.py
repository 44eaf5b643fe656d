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
from model.compiled_block import CompiledBlockPass, row_buckets
from model.recursive import RecursiveLM
from scheduler.config import EngineConfig
from scheduler.exit_policy import GATE, confidence, exits, forced_exit_depth, may_exit
from scheduler.kv_cache import KVCache, LayerKV, PagedAttention
from scheduler.row_batch import RowBatch
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
    """One step's rows, sorted by depth: per item (host lists, and the device tensors the
    attention metadata needs) and per row (device)."""

    items: list[ScheduledItem]
    depths: list[int]
    hidden: torch.Tensor
    positions: torch.Tensor  # [T]
    depth_rows: torch.Tensor  # [T]
    seq_rows: torch.Tensor  # [T] the row batch slot of each row's request
    seq_items: torch.Tensor  # [I]
    depth_items: torch.Tensor  # [I]
    query_start_loc: torch.Tensor  # [I + 1] int32
    context_lens: torch.Tensor  # [I] int32
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
        self.rows = RowBatch(
            config.max_num_seqs, self.loops, config.max_model_len, cache.block_size, self.device
        )
        self.block_pass = model.block_forward
        if config.compile_block:
            buckets = config.compile_buckets or row_buckets(config.max_num_batched_tokens)
            self.block_pass = CompiledBlockPass(model, buckets)
        if config.exit_measure == GATE and model.exit_heads is None:
            raise ValueError("exit measure 'gate' needs a checkpoint with learned exit heads")
        if self.device.type == "cpu":
            cpu_kernel_available()  # build (or load) the C++ kernels now, not in the first step

    def forget(self, request_id: str) -> None:
        """Drop a request's in-flight hidden rows and its row slot (it was aborted)."""
        self.hidden.pop(request_id, None)
        self.rows.remove(request_id)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, sequence_mode: bool
    ) -> tuple[dict[str, ItemResult], StepCounts]:
        for rid in out.dropped:
            self.hidden.pop(rid, None)
        self.rows.update(out.dropped, out.new_requests, out.new_blocks)
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
            batch.depth_items = batch.depth_items + 1
        if not every_loop:
            self._keep_hidden(batch, results)
        return results, counts

    def _may_leave_early(self, out: SchedulerOutput) -> bool:
        """Whether any item could exit before the last loop (by a forced schedule, or its
        thresholds): then each loop is its own step, so exits free their rows at once."""
        if self.config.forced_exit_weights:
            return True
        last = self.loops - 1
        known = self.rows.requests
        return any(
            may_exit(
                d, known[it.request_id].exit_thresholds[d], known[it.request_id].min_loops, last
            )
            for it in out.items
            for d in range(it.depth, last)
        )

    def _build(self, items: list[ScheduledItem]) -> _Batch:
        """The step's rows (``items`` sorted by depth): loop-0 items' embeddings, in one
        lookup, then the kept hidden rows of the others; per row its position, depth and
        request slot, expanded on the device from per-item values sent in one copy."""
        bounds, starts, lens, seqs, tokens, kept = [], [], [], [], [], []
        row = 0
        for it in items:
            if it.depth == 0:
                tokens.extend(it.token_ids)
            else:
                kept.append(self.hidden.pop(it.request_id))
            bounds.append((row, row + it.num_tokens))
            row += it.num_tokens
            starts.append(it.start)
            lens.append(it.num_tokens)
            seqs.append(self.rows.slot[it.request_id])
        depths = [it.depth for it in items]
        n = len(items)
        packed = [*seqs, *depths, *starts, *lens, 0, *(hi for _, hi in bounds), *tokens]
        on_device = torch.tensor(packed).to(self.device)
        seq_items, depth_items, start_items, len_items = on_device[: 4 * n].view(4, n)
        qsl = on_device[4 * n : 5 * n + 1]
        hidden = [self.model.embed_tokens(on_device[5 * n + 1 :])] if tokens else []
        positions = torch.arange(row, device=self.device) + (
            start_items - qsl[:-1]
        ).repeat_interleave(len_items, output_size=row)
        batch = _Batch(
            items=items,
            depths=depths,
            hidden=torch.cat(hidden + kept),
            positions=positions,
            depth_rows=depth_items.repeat_interleave(len_items, output_size=row),
            seq_rows=seq_items.repeat_interleave(len_items, output_size=row),
            seq_items=seq_items,
            depth_items=depth_items,
            query_start_loc=qsl.to(torch.int32),
            context_lens=(start_items + len_items).to(torch.int32),
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
                segments.append((it, it.start, it.num_tokens))
                rows.extend(range(lo, hi))
        if not rows:
            return
        at = torch.tensor(rows, device=self.device)
        attention = self._one_depth_attention(self.cache.prefix, batch, segments, at)
        entered = self.model.enter(
            batch.hidden.index_select(0, at), batch.positions.index_select(0, at), attention
        )
        batch.hidden = batch.hidden.index_copy(0, at, entered)

    def _pass(self, batch: _Batch, counts: StepCounts) -> None:
        for it, d in zip(batch.items, batch.depths, strict=True):
            counts.rows[d] += it.num_tokens
        meta = self.rows.metadata(
            batch.seq_items,
            batch.depth_items,
            batch.query_start_loc,
            batch.context_lens,
            max(it.num_tokens for it in batch.items),
            max(it.start + it.num_tokens for it in batch.items),
        )
        slot_mapping = self.rows.slot_mapping(batch.seq_rows, batch.depth_rows, batch.positions)
        attention = PagedAttention(self.cache, meta, slot_mapping, self.scale)
        # one depth for the whole batch (always in sequence mode): the int fast path skips the
        # per-depth row segmentation in every linear layer
        counts.depths_per_pass.append(len(set(batch.depths)))
        uniform = counts.depths_per_pass[-1] == 1
        depth = batch.depths[0] if uniform else batch.depth_rows
        batch.hidden = self.block_pass(batch.hidden, depth, batch.positions, attention)

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
                req = self.rows.requests[it.request_id]
                exit_now = d == last or may_exit(d, req.exit_thresholds[d], req.min_loops, last)
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
            [self.rows.requests[it.request_id].params for it, _, _ in cand],
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
            params = self.rows.requests[it.request_id].params
            results[it.request_id] = ItemResult(sample=host.sample(j, params), exit_depth=d)
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
                segments.append((it, it.start, it.num_tokens))
                rows.extend(range(lo, hi))
            elif it.request_id in early:
                segments.append((it, it.start + it.num_tokens - 1, 1))
                rows.append(hi - 1)
        if not rows:
            return batch.hidden
        at = torch.tensor(rows, device=self.device)
        attention = self._one_depth_attention(self.cache.suffix, batch, segments, at)
        left = self.model.leave(
            batch.hidden.index_select(0, at), batch.positions.index_select(0, at), attention
        )
        return batch.hidden.index_copy(0, at, left)

    def _one_depth_attention(
        self,
        layers: LayerKV,
        batch: _Batch,
        segments: list[tuple[ScheduledItem, int, int]],
        rows: torch.Tensor,
    ) -> PagedAttention:
        """The backend of a pass through a unique stack (``RecursiveLM.enter`` / ``leave``):
        one segment per (item, first position, rows), K/V in ``layers`` under each item's
        depth-0 block table; ``rows`` are the segments' rows of ``batch``."""
        slot = self.rows.slot
        n = len(segments)
        qsl = [0]
        for _, _, k in segments:
            qsl.append(qsl[-1] + k)
        packed = [slot[it.request_id] for it, _, _ in segments] + [s + k for _, s, k in segments]
        at = torch.tensor(packed + qsl).to(self.device)
        seq, ctx, qsl_t = at[:n], at[n : 2 * n], at[2 * n :]
        depth0 = torch.zeros_like(seq)
        meta = self.rows.metadata(
            seq,
            depth0,
            qsl_t.to(torch.int32),
            ctx.to(torch.int32),
            max(k for _, _, k in segments),
            max(s + k for _, s, k in segments),
        )
        seq_rows = batch.seq_rows.index_select(0, rows)
        positions = batch.positions.index_select(0, rows)
        slot_mapping = self.rows.slot_mapping(seq_rows, torch.zeros_like(seq_rows), positions)
        return PagedAttention(layers, meta, slot_mapping, self.scale)

    def _exit_rule(
        self, conf: torch.Tensor, cand: list[tuple[ScheduledItem, int, int]]
    ) -> torch.Tensor:
        """``exits`` over early candidates with their confidences [R] -> [R] bool."""
        slot = self.rows.slot
        at = torch.tensor([[slot[it.request_id], d] for it, d, _ in cand]).to(self.device)
        seq, depth = at.T
        thr = self.rows.thresholds[seq, depth].to(conf.dtype)
        return exits(conf, depth, thr, self.rows.min_loops[seq], self.loops - 1)

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
        fill: list[tuple[int, int, int]] = []  # (row, depth to fill, exit depth)
        for _, d, row in fills:
            for deeper in range(d + 1, self.loops):
                fill.append((row, deeper, d))
                counts.fills[deeper] += 1
        fill.sort(key=lambda f: f[1])  # one slice per depth
        at, depth, exit_depth = torch.tensor(fill).to(self.device).T
        seq = batch.seq_rows.index_select(0, at)
        positions = batch.positions.index_select(0, at)
        slot_t = self.rows.slot_mapping(seq, depth, positions)
        if self.config.kv_fill == "copy":
            src_t = self.rows.slot_mapping(seq, exit_depth, positions)
            for k_layer, v_layer in zip(self.cache.k, self.cache.v, strict=True):
                for t in (k_layer, v_layer):
                    flat = t.view(-1, *t.shape[2:])
                    flat[slot_t] = flat[src_t]
            return
        self.model.fill_kv(
            batch.hidden.index_select(0, at),
            depth,
            positions,
            slot_t,
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
