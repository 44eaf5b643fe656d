"""The async front: concurrent streams, cancellation, overload, rejection, crash, shutdown."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.generate import greedy_generate
from model.recursive import RecursiveLM
from scheduler.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineOverloaded,
    RequestFailed,
    ShuttingDown,
)
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.sampling import SamplingParams
from scheduler.scheduler import RequestRejected

PARAMS = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def rrt(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    return convert(
        load_model(tiny_hf[0]), 2, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )[0].eval()


def _front(model: RecursiveLM, **kw: object) -> AsyncEngine:
    cfg = EngineConfig(block_size=4, num_blocks=128, max_model_len=64)
    return AsyncEngine(lambda: Engine(model, cfg), **kw)


async def _collect(front: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    return [t async for o in front.generate(rid, prompt, PARAMS) for t in o.token_ids]


def test_concurrent_streams_complete_in_order(rrt: RecursiveLM) -> None:
    prompts = {f"r{i}": [3 + i, 40 - i, 7, 9 + 2 * i][: 1 + i % 4] for i in range(8)}

    async def main() -> dict[str, list[int]]:
        front = _front(rrt)
        try:
            outs = await asyncio.gather(*(_collect(front, r, p) for r, p in prompts.items()))
        finally:
            await front.shutdown(grace_seconds=1)
        return dict(zip(prompts, outs, strict=True))

    got = asyncio.run(main())
    assert got == {r: greedy_generate(rrt, p, PARAMS.max_tokens) for r, p in prompts.items()}


def test_engine_is_built_and_stepped_on_its_own_thread(rrt: RecursiveLM) -> None:
    threads: list[str] = []
    cfg = EngineConfig(block_size=4, num_blocks=128, max_model_len=64)

    def build() -> Engine:
        threads.append(threading.current_thread().name)
        return Engine(rrt, cfg)

    async def main() -> list[int]:
        front = AsyncEngine(build)
        try:
            return await _collect(front, "r", [4, 5, 6])
        finally:
            await front.shutdown(grace_seconds=1)

    assert asyncio.run(main()) == greedy_generate(rrt, [4, 5, 6], PARAMS.max_tokens)
    assert threads == ["loopserve-engine"]


def test_a_failing_build_raises_from_the_constructor() -> None:
    def build() -> Engine:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        AsyncEngine(build)


def test_leaving_a_stream_aborts_and_frees_blocks(rrt: RecursiveLM) -> None:
    async def main() -> tuple[int, int]:
        front = _front(rrt)
        long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        stream = front.generate("x", [5, 6, 7, 8, 9], long)
        async for _ in stream:
            break
        await stream.aclose()
        await front.abort("nothing-here")  # a barrier: the engine thread has run the abort
        used = front.engine.scheduler.allocator.num_used
        left = len(front.engine.scheduler.requests)
        await front.shutdown(grace_seconds=1)
        return used, left

    assert asyncio.run(main()) == (0, 0)


def test_rejected_and_overloaded_requests(rrt: RecursiveLM) -> None:
    async def main() -> None:
        front = _front(rrt, max_queue=0)
        with pytest.raises(EngineOverloaded, match="queue is full"):
            await _collect(front, "a", [1, 2])
        front.max_queue = 8
        with pytest.raises(RequestRejected, match="maximum context length"):
            await _collect(front, "b", list(range(3, 90)))
        await front.shutdown(grace_seconds=1)
        with pytest.raises((ShuttingDown, EngineDeadError)):
            await _collect(front, "c", [1, 2])

    asyncio.run(main())


def test_engine_crash_fails_requests_and_marks_dead(rrt: RecursiveLM) -> None:
    """A step that always raises: the lone request is blamed first (nothing can clear it),
    but when the next request's step fails too the fault is the engine's: it is dead."""

    async def main() -> None:
        front = _front(rrt)

        def boom() -> None:
            raise RuntimeError("injected fault")

        front.engine.step = boom  # type: ignore[method-assign]
        with pytest.raises(RequestFailed, match="injected fault"):
            await _collect(front, "a", [1, 2, 3])
        with pytest.raises(EngineDeadError, match="injected fault"):
            await _collect(front, "b", [1, 2, 3])
        assert not front.alive
        with pytest.raises(EngineDeadError):
            await _collect(front, "c", [1, 2, 3])

    asyncio.run(main())


def test_shutdown_lets_in_flight_requests_finish(rrt: RecursiveLM) -> None:
    async def main() -> list[int]:
        front = _front(rrt)
        task = asyncio.create_task(_collect(front, "a", [4, 5, 6]))
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        await front.shutdown(grace_seconds=30)
        return await task

    assert asyncio.run(main()) == greedy_generate(rrt, [4, 5, 6], PARAMS.max_tokens)


def test_a_burst_is_limited_in_sequences_before_the_engine_takes_it_in(rrt: RecursiveLM) -> None:
    """Adds queued towards the engine thread count: 20 at once with room for 4 sequences."""

    async def main() -> tuple[int, list[str]]:
        front = _front(rrt, max_queue=4)
        engine, peak = front.engine, [0]
        add = engine.add_request

        def counting_add(*args: object) -> None:
            add(*args)  # type: ignore[arg-type]
            peak[0] = max(peak[0], len(engine.scheduler.waiting))

        engine.add_request = counting_add  # type: ignore[method-assign]
        fan = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, n=3)

        async def one(i: int) -> str:
            try:
                async for _ in front.generate(f"r{i}", [3, 4, 5], fan):
                    pass
            except EngineOverloaded:
                return "429"
            return "ok"

        try:
            outcomes = await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            await front.shutdown(grace_seconds=1)
        return peak[0], outcomes

    peak, outcomes = asyncio.run(main())
    assert peak <= 4 and "429" in outcomes and "ok" in outcomes


def test_a_duplicate_request_id_fails_alone(rrt: RecursiveLM) -> None:
    async def main() -> list[int]:
        front = _front(rrt)
        first = asyncio.create_task(_collect(front, "same", [4, 5, 6]))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in use"):
            await _collect(front, "same", [7, 8])
        try:
            return await asyncio.wait_for(first, 30)
        finally:
            await front.shutdown(grace_seconds=1)

    assert asyncio.run(main()) == greedy_generate(rrt, [4, 5, 6], PARAMS.max_tokens)


def test_a_step_failure_fails_only_the_request_it_belongs_to(rrt: RecursiveLM) -> None:
    """A request whose rows make every step raise (like sampling on NaN probabilities)
    fails with RequestFailed; the requests batched with it finish and the engine lives."""
    poison = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, seed=666)

    async def main() -> tuple[dict[str, list[int]], BaseException | None]:
        front = _front(rrt)
        step = front.engine.step

        def faulty_step() -> object:
            if any(r.params.seed == 666 for r in front.engine.scheduler.running):
                raise RuntimeError("probability tensor contains nan")
            return step()

        front.engine.step = faulty_step  # type: ignore[method-assign]

        async def bad() -> BaseException | None:
            try:
                async for _ in front.generate("bad", [9, 9, 9], poison):
                    pass
            except RequestFailed as e:
                return e
            return None

        try:
            tasks = [asyncio.create_task(_collect(front, f"r{i}", [3 + i, 7])) for i in range(3)]
            error = await bad()
            good = dict(zip(["r0", "r1", "r2"], await asyncio.gather(*tasks), strict=True))
            good["after"] = await _collect(front, "after", [4, 5, 6])
            assert front.alive
        finally:
            await front.shutdown(grace_seconds=1)
        return good, error

    good, error = asyncio.run(main())
    assert isinstance(error, RequestFailed) and "nan" in str(error)
    expected = {f"r{i}": greedy_generate(rrt, [3 + i, 7], PARAMS.max_tokens) for i in range(3)}
    assert good == {**expected, "after": greedy_generate(rrt, [4, 5, 6], PARAMS.max_tokens)}


def test_a_step_wakes_each_event_loop_once(rrt: RecursiveLM) -> None:
    """Eight streams on one loop: the engine thread hands over each step's tokens in one
    cross-thread call, not one per token."""
    prompts = {f"r{i}": [3 + i, 40 - i, 7] for i in range(8)}
    steps = 0

    async def main() -> tuple[int, int, dict[str, list[int]]]:
        nonlocal steps
        loop = asyncio.get_running_loop()
        real, calls = loop.call_soon_threadsafe, [0]

        def counting(*args: object, **kw: object) -> object:
            calls[0] += 1
            return real(*args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def count_steps(_stats: object) -> None:
            nonlocal steps
            steps += 1

        front = _front(rrt, on_stats=count_steps)
        try:
            outs = await asyncio.gather(*(_collect(front, r, p) for r, p in prompts.items()))
            tokens = sum(map(len, outs))
        finally:
            await front.shutdown(grace_seconds=1)
        return calls[0], tokens, dict(zip(prompts, outs, strict=True))

    calls, tokens, got = asyncio.run(main())
    assert got == {r: greedy_generate(rrt, p, PARAMS.max_tokens) for r, p in prompts.items()}
    assert tokens == 8 * PARAMS.max_tokens
    # adds and shutdown settle a few futures; deliveries add at most one call per step
    assert calls <= steps + 2 * len(prompts) + 4 < tokens + 2 * len(prompts)
