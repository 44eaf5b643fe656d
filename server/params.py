"""Request fields -> engine SamplingParams, refusing (400, naming the field) what the engine
cannot do, and listing the unknown fields it ignores."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from scheduler.sampling import SamplingParams
from scheduler.structured import GrammarSpec
from server.errors import bad_request
from server.protocol import (
    NEUTRAL_EXTENSIONS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)

log = logging.getLogger(__name__)
GREEDY_BELOW = 1e-5  # temperatures this small overflow the softmax: treat them as greedy
IGNORED_HEADER = "X-Loopserve-Ignored-Fields"
# generation_config.json fields that become a request's defaults (vLLM's --generation-config auto)
DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def ignored_fields(req: SamplingFields) -> list[str]:
    """The fields loopserve ignores in ``req``: unknown ones, and vLLM extensions sent at their
    neutral value. A known extension at any other value would change the output: 400."""
    ignored = []
    for name, value in req.extra_fields().items():
        if name in NEUTRAL_EXTENSIONS and value != NEUTRAL_EXTENSIONS[name]:
            neutral = NEUTRAL_EXTENSIONS[name]
            raise bad_request(
                f"{name} is not supported by loopserve; send {neutral!r} or omit it", name
            )
        ignored.append(name)
    if ignored:
        log.debug("ignored request fields: %s", ", ".join(ignored))
    return ignored


def check_supported(req: SamplingFields) -> None:
    """Fields every endpoint shares that only make sense together."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")


def check_completion(req: CompletionRequest) -> None:
    check_supported(req)
    if req.suffix:
        raise bad_request("suffix is not supported by loopserve", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (loopserve returns every sample)", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens=0 generates nothing; it needs echo=true", "max_tokens")
    if req.max_tokens == 0 and req.stream:
        raise bad_request("max_tokens=0 (scoring the prompt) cannot stream", "stream")


def check_chat(req: ChatCompletionRequest) -> None:
    check_supported(req)
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("chat streams do not carry prompt_logprobs", "prompt_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    both = (req.max_tokens, req.max_completion_tokens)
    if None not in both and both[0] != both[1]:
        raise bad_request(
            "max_tokens and max_completion_tokens disagree; send one", "max_completion_tokens"
        )


def max_tokens_for(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    explicit: bool = True,
    prompt_param: str = "prompt",
    tokens_param: str = "max_tokens",
) -> int:
    """The request's token budget: what it asked for, or the rest of the context. A default
    it did not send itself is clamped to the context instead of refused. The params name
    the fields the prompt and the budget came from (chat: ``messages``, and
    ``max_completion_tokens`` when sent)."""
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"the prompt has {prompt_len} tokens; this model's maximum context length is "
            f"{max_model_len} tokens including at least one generated token",
            prompt_param,
        )
    if requested is None:
        return room
    if requested > room and explicit:
        raise bad_request(
            f"{tokens_param}={requested} plus the prompt's {prompt_len} tokens exceeds this "
            f"model's maximum context length of {max_model_len} tokens",
            tokens_param,
        )
    return min(requested, room)


def logit_bias(req: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as (id, bias) pairs, every id inside the vocabulary."""
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        if not key.isascii() or not key.isdigit() or int(key) >= vocab_size:
            raise bad_request(
                f"logit_bias key {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                "logit_bias",
            )
        pairs.append((int(key), bias))
    return tuple(pairs)


def grammar_spec(req: SamplingFields) -> GrammarSpec | None:
    """The output constraint a request asks for: ``response_format`` (OpenAI's) or
    ``structured_outputs`` (vLLM's), at most one of them and one constraint each."""
    fmt, so = req.response_format, req.structured_outputs
    spec = None
    if fmt is not None and fmt.type == "json_object":
        spec = GrammarSpec("json_object", field="response_format")
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("json_schema needs a schema", "response_format.json_schema")
        spec = GrammarSpec("json", json.dumps(fmt.json_schema.schema_), "response_format")
    if so is None:
        return spec
    given = [
        name
        for name in ("json_", "regex", "choice", "grammar", "json_object")
        if getattr(so, name) not in (None, False)
    ]
    if len(given) != 1 or spec is not None:
        raise bad_request(
            "send exactly one constraint (structured_outputs: one of json, regex, choice, "
            "grammar, json_object; not with a response_format other than text)",
            "structured_outputs",
        )
    name = given[0]
    if name == "json_":
        value = so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)
        return GrammarSpec("json", value)
    if name == "json_object":
        return GrammarSpec("json_object")
    if name == "choice":
        return GrammarSpec("choice", json.dumps(so.choice))
    return GrammarSpec(name, getattr(so, name))  # type: ignore[arg-type]


def sampling_params(
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    vocab_size: int,
    defaults: Mapping[str, float] | None = None,
    grammar: GrammarSpec | None = None,
) -> SamplingParams:
    """The engine's parameters; fields the request left out take the model's
    ``generation_config.json`` value (``defaults``) where it has one. ``grammar`` (a forced
    tool choice) replaces the request's own constraint, which the caller has refused."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    given = {n: getattr(req, n) for n in DEFAULTABLE}
    for name, value in (defaults or {}).items():
        if name not in req.model_fields_set:
            given[name] = value
    temperature = 0.0 if given["temperature"] < GREEDY_BELOW else given["temperature"]
    stop_ids = tuple(req.stop_token_ids or ())
    if any(t >= vocab_size for t in stop_ids):
        raise bad_request(f"stop_token_ids must be below {vocab_size}", "stop_token_ids")
    if req.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens={req.min_tokens} is more than the {max_tokens} tokens allowed",
            "min_tokens",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=max(int(given["top_k"]), 0),
            top_p=given["top_p"],
            min_p=given["min_p"],
            seed=req.seed,
            stop=stop,
            stop_token_ids=stop_ids,
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            n=req.n,
            exit_threshold=req.exit_threshold,
            min_loops=req.min_loops,
            repetition_penalty=given["repetition_penalty"],
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=logit_bias(req, vocab_size),
            min_tokens=req.min_tokens,
            grammar=grammar or grammar_spec(req),
        )
    except ValueError as e:
        raise bad_request(str(e)) from e
