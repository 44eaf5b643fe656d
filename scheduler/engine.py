"""The engine: schedule → execute → update, one pass of the shared block per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from model.recursive import RecursiveLM
from scheduler.config import EngineConfig
from scheduler.detokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.kv_cache import KVCache
from scheduler.prompt_logprobs import PromptLogprob, prompt_logprobs
from scheduler.request import FinishReason
from scheduler.runner import ModelRunner
from scheduler.sampling import SampleResult, SamplingParams
from scheduler.scheduler import Scheduler, TokenEvent
from scheduler.structured import GrammarCompiler, GrammarState


@dataclass
class RequestOutput:
    """What one step produced for one sample of a request (``index`` < n)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    samples: list[SampleResult]
    exit_depths: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    first_scheduled: float | None = None  # time.monotonic() the sequence first got a slot
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """One step, for logs and metrics (the Prometheus adapter consumes these)."""

    step_seconds: float
    rows_per_depth: list[int]
    exits_per_depth: list[int]
    fills_per_depth: list[int]
    num_running: int
    num_waiting: int
    kv_usage: float
    preemptions: int
    tokens_emitted: int
    phase_seconds: dict[str, float]  # host wall time of the step's phases (see StepCounts)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache so far
    prefix_hits: int = 0  # of which were cached
    depths_per_pass: list[int] = field(default_factory=list)  # depths each block pass ran


def _sample_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


class Engine:
    """Serves one model: requests in, token/text deltas out, one block pass per ``step()``."""

    def __init__(
        self,
        model: RecursiveLM,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.loops = model.config.loops
        self.sequence_mode = config.batching == "sequence" or self.loops == 1
        aligned = not self.sequence_mode and (
            config.depth_alignment == "aligned"
            or (config.depth_alignment == "auto" and model.has_dense_weights)
        )
        eos = model.config.arch.eos_token_id + config.eos_token_ids
        self.scheduler = Scheduler(config, self.loops, eos, aligned)
        cache = KVCache(
            model.config, config.num_blocks, config.block_size, model.dtype, model.device
        )
        self.runner = ModelRunner(model, cache, config, seed)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._groups: dict[str, list[str]] = {}
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """A fresh matcher for one sample of a constrained request (compiled once, cached)."""
        if params.grammar is None:
            return None
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer")
        if self._grammars is None:
            stop = tuple(sorted(self.scheduler.eos_token_ids))
            vocab = self.model.config.arch.vocab_size
            self._grammars = GrammarCompiler(self.tokenizer, vocab, stop)
        return self._grammars.start(params.grammar)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (``params.n`` samples); raises RequestRejected if it cannot fit."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids = [_sample_id(request_id, i) for i in range(params.n)]
        added: list[str] = []
        try:
            for i, sid in enumerate(ids):
                seed = None if params.seed is None else params.seed + i
                p = replace(params, seed=seed)
                grammar = self._grammar(p)
                leader = ids[0] if i and self.config.enable_prefix_caching else None
                self.scheduler.add_request(sid, prompt_ids, p, leader).grammar = grammar
                added.append(sid)
                if self.tokenizer is not None:
                    self._detok[sid] = IncrementalDetokenizer(
                        self.tokenizer, params.stop, params.include_stop_str_in_output
                    )
        except ValueError:
            for sid in added:
                self.scheduler.abort(sid)
                self.scheduler.pop_finished(sid)
                self._detok.pop(sid, None)
            raise
        self._groups[request_id] = ids

    def abort(self, request_id: str) -> None:
        """Cancel every sample of a request; frees its slots, KV blocks and the hidden rows
        it had in flight at once (an idle engine takes no next step to drop them)."""
        for sid in self._groups.pop(request_id, []):
            self.scheduler.abort(sid)
            self.scheduler.pop_finished(sid)
            self._detok.pop(sid, None)
            self.runner.forget(sid)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def score_prompt(self, prompt_ids: list[int], top_n: int) -> list[PromptLogprob]:
        """The prompt's own tokens' logprobs at full depth (see ``prompt_logprobs``)."""
        if len(prompt_ids) > self.config.max_model_len:
            raise ValueError(f"the prompt is longer than {self.config.max_model_len} tokens")
        return prompt_logprobs(self.model, prompt_ids, top_n)

    def step(self) -> tuple[list[RequestOutput], EngineStats]:
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        schedule_s = time.perf_counter() - start
        results, counts = self.runner.execute(scheduled, self.sequence_mode)
        counts.phases["schedule"] = schedule_s
        t = time.perf_counter()
        events = self.scheduler.update_from_output(scheduled, results)
        t = counts.timed("update", t)
        outputs = [self._output(e) for e in events]
        counts.timed("detokenize+outputs", t)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        s = self.scheduler
        stats = EngineStats(
            step_seconds=time.perf_counter() - start,
            rows_per_depth=counts.rows,
            exits_per_depth=counts.exits,
            fills_per_depth=counts.fills,
            num_running=len(s.running),
            num_waiting=s.num_waiting,
            kv_usage=s.allocator.usage,
            preemptions=s.num_preemptions,
            tokens_emitted=len(events),
            phase_seconds=counts.phases,
            prefix_queries=s.prefix_cache.queries if s.prefix_cache else 0,
            prefix_hits=s.prefix_cache.hits if s.prefix_cache else 0,
            depths_per_pass=counts.depths_per_pass,
        )
        return outputs, stats

    def _output(self, event: TokenEvent) -> RequestOutput:
        sid = event.request_id
        req = self.scheduler.requests[sid]
        reason = event.finish_reason
        if req.grammar is not None:
            req.grammar.accept(event.sample.token)
            if req.grammar.finished and reason is None:  # the structure is complete
                reason = FinishReason.STOP
                self.scheduler.finish(sid, reason)
        text = ""
        detok = self._detok.get(sid)
        if detok is not None:
            checking = len(req.output_ids) >= req.params.min_tokens
            delta = detok.update(req.output_ids, final=reason is not None, check_stop=checking)
            text = delta.text
            if delta.stopped and reason is None:
                reason = FinishReason.STOP
                self.scheduler.finish(sid, reason)
        request_id, index = sid.rsplit("#", 1)
        if reason is not None:
            self._retire(request_id, sid)
        return RequestOutput(
            request_id=request_id,
            index=int(index),
            token_ids=[event.sample.token],
            text=text,
            samples=[event.sample],
            exit_depths=[event.exit_depth],
            finish_reason=reason.value if reason else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            first_scheduled=req.first_scheduled,
            cached_tokens=req.cached_tokens,
        )

    def _retire(self, request_id: str, sid: str) -> None:
        self.scheduler.pop_finished(sid)
        self._detok.pop(sid, None)
        group = self._groups.get(request_id)
        if group is not None:
            group.remove(sid)
            if not group:
                del self._groups[request_id]

    def generate(
        self, prompts: dict[str, list[int]], params: SamplingParams
    ) -> dict[str, list[list[int]]]:
        """Run the given requests to completion (offline use, tests): ids -> n token lists."""
        for rid, ids in prompts.items():
            self.add_request(rid, ids, params)
        out: dict[str, list[list[int]]] = {rid: [[] for _ in range(params.n)] for rid in prompts}
        while self.has_work:
            for o in self.step()[0]:
                out[o.request_id][o.index].extend(o.token_ids)
        return out
