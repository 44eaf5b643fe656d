"""The engine's async front: a dedicated stepping thread and per-request output streams.

Everything that mutates the engine (add, abort) runs on the engine thread between steps,
handed over as commands with futures, so the engine itself needs no locks and the event
loop never waits for a step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.engine import Engine, EngineStats, RequestOutput
from scheduler.prompt_logprobs import PromptLogprob
from scheduler.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a bug or shutdown); no further requests are served."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the client should retry later."""


class ShuttingDown(RuntimeError):
    """The engine is draining and takes no new requests."""


class RequestFailed(RuntimeError):
    """A step raised because of this request (found by re-running the step without it);
    the request is failed, the engine keeps serving the others."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    remaining: int
    prompt_ids: list[int]
    params: SamplingParams
    taken: bool = False  # the engine thread has added it to the engine
    started: bool = False  # an output was delivered: the request can no longer be re-run


@dataclass
class _Command:
    kind: str
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = field(default=None, repr=False)


class AsyncEngine:
    """Runs ``engine.step()`` in its own thread; ``generate`` streams a request's outputs.

    ``build`` makes the engine *on that thread*, and the constructor returns once it has (or
    re-raises what it raised). Loading the model on the thread that will step it matters on the
    CPU: once another thread has run OpenMP-parallel torch ops (a model load does), every step
    of a SmolLM2-135M decode on a second thread took ~1.7x as long (23 → 39 ms, 2 cores).
    """

    def __init__(
        self,
        build: Callable[[], Engine],
        max_queue: int = 256,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.on_stats = on_stats
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # insertion order = arrival order
        self._admission = threading.Lock()
        self._inbound = 0  # sequences of add commands the engine thread has not taken in
        self._unconfirmed = False  # the last isolation blamed a request no step cleared
        self._stop = threading.Event()
        self._accepting = True
        self._error: BaseException | None = None
        self._built = threading.Event()
        self._engine: Engine | None = None
        self._thread = threading.Thread(
            target=self._main, args=(build,), name="loopserve-engine", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._engine is None:
            self._thread.join()
            assert self._error is not None
            raise self._error

    @property
    def engine(self) -> Engine:
        assert self._engine is not None  # the constructor raised otherwise
        return self._engine

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def accepting(self) -> bool:
        """False from the start of a drain (``shutdown``) on: a readiness probe's answer."""
        return self._accepting and self.alive

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot, including adds not yet taken in by the engine."""
        return self.engine.scheduler.num_waiting + self._inbound

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of all ``params.n`` samples as they come; leaving early aborts the request.

        Admission counts sequences (``n`` per request) against ``max_queue``, both those the
        engine waits on and those still on their way to its thread, so a burst cannot pass it.
        """
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._reserve(params.n)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), params.n, prompt_ids, params)
        self._streams[request_id] = stream
        try:
            await self._call("add", request_id, prompt_ids, params)
            while stream.remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.remaining -= 1
                yield item
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if stream.remaining:  # our own id: duplicates never get this far
                self._submit(_Command("abort", (request_id,)))

    def _reserve(self, sequences: int) -> None:
        """Count ``sequences`` as waiting, or refuse them if the queue cannot hold them."""
        with self._admission:
            waiting = self.engine.scheduler.num_waiting + self._inbound
            if waiting + sequences > self.max_queue:
                raise EngineOverloaded(
                    f"the request queue is full: {waiting} of {self.max_queue} sequences "
                    f"waiting, this request needs {sequences}"
                )
            self._inbound += sequences

    async def abort(self, request_id: str) -> None:
        await self._call("abort", request_id)

    async def score_prompt(self, prompt_ids: list[int], top_n: int) -> list[PromptLogprob]:
        """The prompt's own tokens' logprobs, computed on the engine thread between steps."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        return await self._call("score", prompt_ids, top_n)

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_seconds``, abort
        whatever is left, and stop the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while self._streams and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self._submit(_Command("abort", (rid,)))
            self._deliver(rid, ShuttingDown("the server shut down before the request finished"))
        self._stop.set()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # -- engine thread ---------------------------------------------------------------------

    async def _call(self, kind: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submit(_Command(kind, args, loop, future))
        return await future

    def _submit(self, command: _Command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _main(self, build: Callable[[], Engine]) -> None:
        try:
            self._engine = build()
        except BaseException as e:  # handed to the constructor, which re-raises it
            self._error = e
            return
        finally:
            self._built.set()
        self._run()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_work:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs, stats = self.engine.step()
                except Exception as e:
                    self._isolate(e)
                    continue
                self._unconfirmed = False
                self._publish(outputs, stats)
        except BaseException as e:  # a bug in the engine: fail every waiter, stay dead
            log.exception("engine thread crashed")
            self._error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine crashed: {e!r}"))
        finally:
            self._fail_commands(EngineDeadError("the engine stopped"))
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError("the engine stopped"))

    def _publish(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """A step's outputs reach each event loop in one wake-up (not one per token: at c = 32
        that was 32 cross-thread calls and loop iterations a step)."""
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.started = True
                per_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in per_loop.items():
            _call_soon(loop, _put_all, items)
        if self.on_stats is not None:
            self.on_stats(stats)

    def _isolate(self, error: Exception) -> None:
        """A step raised: find the request it belongs to and fail only that one.

        Requests are taken out newest first (a request whose arrival made steps fail is the
        likeliest culprit) and the step re-run, until one succeeds: the last one taken out
        is the culprit. Requests taken out before it that have delivered nothing yet are
        added back unchanged; those mid-stream cannot be resumed and fail too. If no step
        succeeds even with every request out, or the culprit's removal does not help the
        next step either, the fault is the engine's: it is marked dead as before.
        """
        if self._unconfirmed:
            raise error
        log.warning("an engine step failed (%r); isolating the request it belongs to", error)
        parked: list[str] = []
        for rid in reversed([r for r, s in list(self._streams.items()) if s.taken]):
            self.engine.abort(rid)
            culprit = rid
            if not self.engine.has_work:
                self._unconfirmed = True
                break
            try:
                outputs, stats = self.engine.step()
            except Exception:
                parked.append(rid)
                continue
            self._publish(outputs, stats)
            break
        else:
            raise error  # no request of ours explains it
        log.error("request %s failed inside the engine: %r", culprit, error)
        self._fail(culprit, RequestFailed(f"the request failed inside the engine: {error!r}"))
        for rid in reversed(parked):
            stream = self._streams[rid]
            if stream.started:
                self._fail(rid, RequestFailed(f"aborted while isolating a failed step: {error!r}"))
            else:
                self.engine.add_request(rid, stream.prompt_ids, stream.params)

    def _fail(self, request_id: str, error: BaseException) -> None:
        self._deliver(request_id, error)
        self._streams.pop(request_id, None)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                handlers = {
                    "add": self._add,
                    "abort": self.engine.abort,
                    "score": self.engine.score_prompt,
                }
                handler = handlers[cmd.kind]
                result = handler(*cmd.args)
            except Exception as e:
                self._resolve(cmd, error=e)
            else:
                self._resolve(cmd, result=result)

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Take an add in: its sequences move from inbound to the engine's waiting queue
        under the admission lock, so ``_reserve`` never sees them in neither count."""
        with self._admission:
            self._inbound -= params.n
            self.engine.add_request(request_id, prompt_ids, params)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.taken = True

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            self._resolve(cmd, error=error)

    @staticmethod
    def _resolve(cmd: _Command, result: Any = None, error: BaseException | None = None) -> None:
        if cmd.future is None or cmd.loop is None:
            return
        fut = cmd.future

        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        _call_soon(cmd.loop, settle)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            _call_soon(stream.loop, stream.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream_queue, item in items:
        stream_queue.put_nowait(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Hand ``fn`` to an event loop from the engine thread; a closed loop has no listener."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.debug("event loop closed; dropping a message for it")
