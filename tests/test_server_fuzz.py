"""Schemathesis against the live server's /openapi.json: no request, valid or not, gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from server_support import LiveServer, write_tiny_rrt

from server.settings import ServeSettings

EXAMPLES = 40


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = write_tiny_rrt(tmp_path_factory.mktemp("fuzz"))
    cfg = ServeSettings(
        model=str(model),
        served_model_name="tiny",
        block_size=4,
        kv_cache_memory="4MiB",
        max_model_len=24,  # bounds the work a generated (valid) request can ask for
        max_queue=64,
        threads=1,
    )
    with LiveServer(cfg) as server:
        yield server


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [
        ("/v1/completions", "POST", POSITIVE),
        ("/v1/completions", "POST", NEGATIVE),
        ("/v1/chat/completions", "POST", POSITIVE),
        ("/v1/chat/completions", "POST", NEGATIVE),
        ("/v1/models/{model}", "GET", POSITIVE),  # a string path parameter has no invalid form
    ],
)
def test_no_server_errors(live: LiveServer, path: str, method: str, mode: GenerationMode) -> None:
    raw = httpx.get(f"{live.url}/openapi.json").json()
    operation = schemathesis.openapi.from_dict(raw)[path][method]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        if mode is POSITIVE and isinstance(case.body, dict):
            case.body["model"] = "tiny"  # reach generation, not just the unknown-model 404
        response = case.call(base_url=live.url, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    statuses: list[int] = []
    check()
    if mode is POSITIVE and method == "POST":
        assert 200 in statuses, statuses
