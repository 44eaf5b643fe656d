"""vLLM's ``/tokenize`` and ``/detokenize``: the server's own tokenizer and chat template, so a
client can count and inspect exactly what the engine will see."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.errors import bad_request
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.routes.chat import render_text
from server.routes.common import ERROR_RESPONSES
from server.state import get_state, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """A ``prompt`` as completions encodes it, or ``messages`` as chat renders them."""
    state = get_state(request)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        text = render_text(state, body.messages, body.add_generation_prompt, False, body.kwargs)
        ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = state.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
    pieces = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=state.info.max_model_len, tokens=ids, token_strs=pieces
    )


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    vocab = state.info.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab})", "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
