"""One HTTP request's engine work: an engine request per prompt, ``n`` samples each, merged
into one stream of (choice index, output), with the request's timings, metrics and log line.

Closing the stream (client gone, error) cancels the pumps, which closes the engine's
generators, which abort the engine requests and free their KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler.async_engine import AsyncEngine
from scheduler.engine import RequestOutput
from scheduler.sampling import SampleResult, SamplingParams
from server.errors import ENGINE_ERRORS, from_engine
from server.metrics import Metrics

log = logging.getLogger("loopserve.requests")
_DONE = object()


@dataclass
class Choice:
    """Everything one sample produced so far."""

    token_ids: list[int] = field(default_factory=list)
    samples: list[SampleResult] = field(default_factory=list)
    exit_depths: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    scheduled_at: float | None = None


class Generation:
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: Metrics,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.n = params[0].n
        self.choices = [Choice() for _ in range(len(prompts) * self.n)]
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self._cached: dict[int, int] = {}  # per prompt: tokens its first sample found cached
        self.caching = engine.engine.config.enable_prefix_caching

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens served from the prefix cache (None: caching is off)."""
        return sum(self._cached.values()) if self.caching else None

    @property
    def mean_loops(self) -> float | None:
        depths = [d for c in self.choices for d in c.exit_depths]
        return sum(d + 1 for d in depths) / len(depths) if depths else None

    async def _pump(self, i: int, queue: asyncio.Queue[object]) -> None:
        try:
            rid = f"{self.request_id}-{i}"
            async for out in self.engine.generate(rid, self.prompts[i], self.params[i]):
                queue.put_nowait((i * self.n + out.index, out))
        except Exception as e:  # handed to the consumer, who maps or re-raises it
            queue.put_nowait(e)
        finally:
            queue.put_nowait(_DONE)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come; engine refusals surface as APIError."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        pumps = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self.prompts))]
        running = len(pumps)
        try:
            while running:
                item = await queue.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, ENGINE_ERRORS):
                    raise from_engine(item)
                elif isinstance(item, Exception):
                    raise item
                elif isinstance(item, tuple):
                    index, out = item
                    self._record(index, out)
                    yield index, out
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._log()

    def _record(self, index: int, out: RequestOutput) -> None:
        now = time.monotonic()
        choice = self.choices[index]
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.start)
        if not choice.token_ids and out.index == 0:
            self.metrics.prompt_tokens.inc(out.prompt_tokens)
            self._cached[index // self.n] = out.cached_tokens
        if choice.last_token_at is not None:
            self.metrics.itl.observe(now - choice.last_token_at)
        choice.first_token_at = choice.first_token_at or now
        choice.scheduled_at = choice.scheduled_at or out.first_scheduled
        choice.last_token_at = now
        choice.token_ids += out.token_ids
        choice.samples += out.samples
        choice.exit_depths += out.exit_depths
        choice.text += out.text
        self.metrics.generation_tokens.inc(len(out.token_ids))
        if out.finish_reason is not None:
            choice.finish_reason = out.finish_reason
            self.metrics.finished(out.finish_reason)
            self.metrics.e2e.observe(now - self.start)
            self._observe_phases(choice, now)

    def _observe_phases(self, choice: Choice, now: float) -> None:
        """vLLM's per-sequence phase histograms, once a choice has finished."""
        first = choice.first_token_at
        assert first is not None
        decode = now - first
        self.metrics.decode_time.observe(decode)
        if len(choice.token_ids) > 1:
            self.metrics.tpot.observe(decode / (len(choice.token_ids) - 1))
        if choice.scheduled_at is not None:
            self.metrics.prefill_time.observe(first - choice.scheduled_at)
            self.metrics.inference_time.observe(now - choice.scheduled_at)

    def _log(self) -> None:
        if all(c.finish_reason is not None for c in self.choices):
            self.metrics.request_prompt_tokens.observe(self.prompt_tokens)
            self.metrics.request_generation_tokens.observe(self.completion_tokens)
        reasons = sorted({c.finish_reason or "aborted" for c in self.choices})
        ttft = "-" if self.first_token_at is None else f"{self.first_token_at - self.start:.3f}s"
        loops = self.mean_loops
        log.info(
            "%s: prompt %d tokens, completion %d tokens in %d choice(s), loops/token %s, "
            "ttft %s, latency %.3fs, finish %s",
            self.request_id,
            self.prompt_tokens,
            self.completion_tokens,
            len(self.choices),
            "-" if loops is None else f"{loops:.2f}",
            ttft,
            time.monotonic() - self.start,
            ",".join(reasons),
        )
