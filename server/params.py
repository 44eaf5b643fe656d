"""Request fields -> engine SamplingParams, refusing (400, naming the field) what the engine
cannot do instead of ignoring it."""

from __future__ import annotations

from scheduler.sampling import SamplingParams
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

GREEDY_BELOW = 1e-5  # temperatures this small overflow the softmax: treat them as greedy


def check_supported(req: SamplingFields) -> None:
    """Fields every endpoint shares that loopserve accepts only at their neutral value."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise bad_request(f"{name} is not supported by loopserve; send 0 or omit it", name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by loopserve", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")


def check_completion(req: CompletionRequest) -> None:
    check_supported(req)
    if req.suffix:
        raise bad_request("suffix is not supported by loopserve", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (loopserve returns every sample)", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs needs prompt logprobs, not supported", "echo")


def check_chat(req: ChatCompletionRequest) -> None:
    check_supported(req)
    if req.tools:
        raise bad_request("tools are not supported by loopserve", "tools")
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice is not supported by loopserve", "tool_choice")
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


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=max(req.top_k, 0),
            top_p=req.top_p,
            min_p=req.min_p,
            seed=req.seed,
            stop=stop,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            n=req.n,
            exit_threshold=req.exit_threshold,
            min_loops=req.min_loops,
        )
    except ValueError as e:
        raise bad_request(str(e)) from e
