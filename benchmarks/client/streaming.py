"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Every failure (HTTP error, reset, timeout, malformed stream) becomes a failed
``RequestResult`` with a message, never an exception: a load test must survive its server.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.client.datasets import SampleRequest
from benchmarks.client.metrics import RequestResult

APIS = ("completions", "chat")
_ERROR_BODY_CHARS = 200


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: the server, the API flavour and the sampling settings."""

    base_url: str
    model: str
    api: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 600.0

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return root_url(self.base_url) + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, req: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if self.ignore_eos:  # an extension (vLLM, loopserve, llama.cpp); OpenAI refuses it
            body["ignore_eos"] = True
        return body


def root_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all name the same server."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1")


class _StreamError(Exception):
    """The server reported an error inside a 200 event stream."""


def _chunk_text(data: dict[str, Any], api: str) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if api == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _read_stream(
    response: httpx.Response, api: str, result: RequestResult, sent: float
) -> tuple[int | None, int | None]:
    """Time the content chunks into ``result``; return the usage's (prompt, completion)."""
    prompt_tokens = completion_tokens = None
    last = sent
    pieces: list[str] = []
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        body = line[len("data:") :].strip()
        if body == "[DONE]":
            break
        data = json.loads(body)
        if "error" in data:
            message = (data["error"] or {}).get("message", "")
            raise _StreamError(f"error event: {message}"[:_ERROR_BODY_CHARS])
        now = time.perf_counter()
        if text := _chunk_text(data, api):
            if not pieces:
                result.ttft = now - sent
            else:
                result.itl.append(now - last)
            last = now
            pieces.append(text)
        if usage := data.get("usage"):
            prompt_tokens = usage.get("prompt_tokens")
            completion_tokens = usage.get("completion_tokens")
    result.latency = time.perf_counter() - sent
    result.generated_text = "".join(pieces)
    result.output_len = len(pieces)  # replaced by the usage or a tokenizer count if any
    return prompt_tokens, completion_tokens


async def send(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    req: SampleRequest,
    t0: float,
    tokenizer: Any = None,
) -> RequestResult:
    """Send ``req`` and time it; ``t0`` is the benchmark's start (for ``result.start``).

    Output tokens come from the server's usage; failing that, from ``tokenizer`` on the
    generated text; failing that, one per content chunk.
    """
    result = RequestResult(prompt_len=req.prompt_len)
    sent = time.perf_counter()
    result.start = sent - t0
    try:
        async with asyncio.timeout(endpoint.timeout):
            async with client.stream(
                "POST", endpoint.url, json=endpoint.payload(req), headers=endpoint.headers
            ) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    result.error = f"HTTP {response.status_code}: {body[:_ERROR_BODY_CHARS]}"
                    return result
                prompt_tokens, completion_tokens = await _read_stream(
                    response, endpoint.api, result, sent
                )
    except TimeoutError:
        result.error = f"timeout: no complete answer within {endpoint.timeout:g} s"
        return result
    except httpx.TimeoutException as e:
        result.error = f"timeout: {type(e).__name__}"
        return result
    except httpx.TransportError as e:  # resets, refused connections, truncated streams
        result.error = f"connection: {type(e).__name__}: {e}"[:_ERROR_BODY_CHARS]
        return result
    except (_StreamError, json.JSONDecodeError, AttributeError, TypeError) as e:
        result.error = f"bad stream: {e}"[:_ERROR_BODY_CHARS]
        return result
    if not result.generated_text and not completion_tokens:
        result.error = "empty: the stream carried no output"
        return result
    if prompt_tokens:
        result.prompt_len = prompt_tokens
    if completion_tokens:
        result.output_len = completion_tokens
    elif tokenizer is not None:
        result.output_len = len(tokenizer.encode(result.generated_text, add_special_tokens=False))
    result.success = True
    return result


async def first_card(base_url: str, api_key: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """The first model object the server lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(root_url(base_url) + "/v1/models", headers=headers)
        response.raise_for_status()
        return response.json()["data"][0]


async def first_model(base_url: str, api_key: str | None, timeout: float = 30.0) -> str:
    """The first model id the server lists (for a run without ``--model``)."""
    return (await first_card(base_url, api_key, timeout))["id"]
