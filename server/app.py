"""The FastAPI app factory: routes, error handlers, body limit, metrics and the lifespan
that logs engine summaries and shuts the engine down with the app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from transformers import PreTrainedTokenizerBase

from scheduler.async_engine import AsyncEngine
from server.access import ResponseCounter
from server.errors import install_error_handlers
from server.limits import BodyLimit
from server.loader import ModelInfo
from server.metrics import Metrics
from server.observer import EngineObserver, log_summaries
from server.routes import chat, completions, info, tokens
from server.settings import ServeSettings
from server.state import ServerState


def create_app(
    engine: AsyncEngine,
    tokenizer: PreTrainedTokenizerBase,
    model: ModelInfo,
    settings: ServeSettings,
) -> FastAPI:
    """An app serving ``engine``; it takes over the engine's ``on_stats`` hook and stops the
    engine when the app shuts down."""
    scheduler = engine.engine.scheduler
    metrics = Metrics(
        model.name,
        model.loops,
        running=lambda: engine.num_running,
        waiting=lambda: engine.num_waiting,
        kv_usage=lambda: scheduler.allocator.usage,
        engine_alive=lambda: float(engine.alive),
    )
    observer = EngineObserver(engine.engine, metrics)
    engine.on_stats = observer

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        summaries = asyncio.create_task(log_summaries(observer, settings.log_interval))
        try:
            yield
        finally:
            summaries.cancel()
            await engine.shutdown(settings.shutdown_grace)

    app = FastAPI(title="loopserve", version="0.1.0", lifespan=lifespan)
    app.state.loopserve = ServerState(engine, tokenizer, model, metrics, settings)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_seconds=settings.body_timeout
    )
    app.add_middleware(ResponseCounter, metrics=metrics)  # added last: outermost
    for router in (completions.router, chat.router, info.router, tokens.router):
        app.include_router(router)
    return app
