"""End to end on the real default model (the exact 3-loop SmolLM2-135M-Instruct): the
official client over HTTP gets the original model's greedy tokens."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_support import LiveServer

from model.checkpoint import load_model
from model.default import DEFAULT_MODEL_NAME
from model.generate import greedy_generate
from model.pull import pull_default
from server.settings import ServeSettings

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    settings = ServeSettings(kv_cache_memory="64MiB", max_model_len=512, threads=2)
    with LiveServer(settings) as server:
        yield server


def test_default_model_chat_matches_the_original(live: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
    (card,) = client.models.list().data
    assert card.id == DEFAULT_MODEL_NAME and card.model_extra["loops"] == 3
    assert card.model_extra["fidelity"]["agreement"] == 1.0
    assert card.model_extra["early_exit"]["enabled"] is False

    out = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True
    )
    text = live.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt = live.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out.usage.prompt_tokens == len(prompt)
    source = load_model(pull_default())
    expected = greedy_generate(source, prompt, 8, source.config.arch.eos_token_id)
    assert out.usage.completion_tokens == len(expected)
    assert out.choices[0].message.content == live.tokenizer.decode(
        expected, skip_special_tokens=True
    )
    assert "Paris" in out.choices[0].message.content
    assert out.usage.model_extra["mean_loops_per_token"] == 3.0

    streamed = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == (
        out.choices[0].message.content
    )
