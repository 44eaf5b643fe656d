"""What the routes share: the engine, tokenizer, model description, metrics and settings.

Held in ``app.state`` so several apps (tests) can live in one process.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from scheduler.async_engine import AsyncEngine
from server.errors import APIError
from server.loader import ModelInfo
from server.metrics import Metrics
from server.settings import ServeSettings


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo
    metrics: Metrics
    settings: ServeSettings

    def check_model(self, name: str | None) -> str:
        """The served model's name, if ``name`` (optional, as in vLLM) names it."""
        if name is not None and name != self.info.name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.info.name!r}",
                param="model",
                code="model_not_found",
            )
        return self.info.name


def get_state(request: Request) -> ServerState:
    return request.app.state.loopserve


async def require_api_key(request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (when a key is set)."""
    key = get_state(request).settings.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare bytes: compare_digest raises on non-ASCII str. Headers arrive as latin-1
    # (their raw bytes); the key as configured, sent UTF-8 encoded.
    given_bytes = given.strip().encode("latin-1")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given_bytes, key.encode()):
        raise APIError(401, "a valid API key is required", code="invalid_api_key")
