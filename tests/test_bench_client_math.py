"""Bench client units: metric math on hand-made timings, arrival statistics, datasets and
the report layout, with no server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from server_support import write_tiny_tokenizer

from benchmarks.client.arrivals import arrival_gaps, arrival_times
from benchmarks.client.datasets import (
    BenchError,
    jsonl_requests,
    load_tokenizer,
    random_requests,
    sharegpt_requests,
)
from benchmarks.client.metrics import RequestResult, compute_metrics, parse_goodput, peaks
from benchmarks.client.report import RunInfo, format_report, result_dict
from benchmarks.compare_report import agreement

PCTS = [50.0, 90.0, 99.0]


def _results() -> list[RequestResult]:
    """Three successes (5, 3 and 1 tokens) and two failures over a 2 s run."""
    ok = dict(success=True)
    return [
        RequestResult(**ok, ttft=0.1, latency=0.5, itl=[0.1] * 4, prompt_len=10, output_len=5),
        RequestResult(**ok, ttft=0.3, latency=1.3, itl=[0.5, 0.5], prompt_len=20, output_len=3),
        RequestResult(**ok, ttft=0.2, latency=0.2, prompt_len=30, output_len=1),
        RequestResult(error="HTTP 500: boom", prompt_len=99, output_len=7),
        RequestResult(error="connection: RemoteProtocolError: peer closed"),
    ]


def test_counts_and_throughputs() -> None:
    m = compute_metrics(_results(), duration=2.0, percentiles=PCTS)
    assert (m.completed, m.failed) == (3, 2)
    assert m.errors == {"HTTP 500": 1, "connection": 1}
    assert (m.total_input, m.total_output) == (60, 9)  # failures count no tokens
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(34.5)
    assert m.request_goodput is None


def test_latency_distributions_by_hand() -> None:
    lat = compute_metrics(_results(), duration=2.0, percentiles=PCTS).latency
    # TTFT [100, 300, 200] ms: linear interpolation between order statistics
    assert lat["ttft"].mean == pytest.approx(200)
    assert lat["ttft"].percentiles == pytest.approx({50.0: 200, 90.0: 280, 99.0: 298})
    # TPOT: (500-100)/4 = 100 and (1300-300)/2 = 500; the one-token request has none
    assert lat["tpot"].mean == pytest.approx(300)
    assert lat["tpot"].median == pytest.approx(300)
    assert lat["tpot"].percentiles[90.0] == pytest.approx(460)
    # ITL pooled over requests: 4 x 100 and 2 x 500
    assert lat["itl"].mean == pytest.approx(1400 / 6)
    assert lat["itl"].median == pytest.approx(100)
    assert lat["itl"].percentiles[90.0] == pytest.approx(500)
    assert lat["e2el"].mean == pytest.approx(2000 / 3)
    assert lat["e2el"].std == pytest.approx(np.std([500, 1300, 200]))


def test_goodput() -> None:
    results = _results()
    # first passes; second's TTFT 300 > 250; third passes (one token: TPOT counts as 0)
    slos = parse_goodput(["ttft:250", "tpot:200"])
    assert compute_metrics(results, 2.0, PCTS, slos).request_goodput == pytest.approx(1.0)
    slos = parse_goodput(["e2el:400"])
    assert compute_metrics(results, 2.0, PCTS, slos).request_goodput == pytest.approx(0.5)


@pytest.mark.parametrize("spec", ["ttft", "itl:5", "tpot:fast", "ttft:-1"])
def test_bad_goodput_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_goodput([spec])


def test_no_successes_read_as_zeros() -> None:
    m = compute_metrics([RequestResult(error="timeout: x")], duration=1.0, percentiles=[99.0])
    assert m.completed == 0 and m.errors == {"timeout": 1}
    assert m.latency["ttft"].percentiles == {99.0: 0.0}


def test_poisson_arrivals_keep_the_mean_rate_and_are_seeded() -> None:
    gaps = arrival_gaps(20_000, rate=10.0, burstiness=1.0, rng=np.random.default_rng(0))
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1.0, rel=0.1)  # exponential: CV² 1
    times = arrival_times(100, 10.0, 1.0, seed=3)
    assert np.array_equal(times, arrival_times(100, 10.0, 1.0, seed=3))
    assert not np.array_equal(times, arrival_times(100, 10.0, 1.0, seed=4))
    assert np.all(np.diff(times) >= 0)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_sets_the_variance_not_the_mean(burstiness: float) -> None:
    gaps = arrival_gaps(20_000, rate=5.0, burstiness=burstiness, rng=np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    # gamma(k): CV² = 1/k
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert np.array_equal(arrival_times(5, math.inf, 1.0, seed=0), np.zeros(5))
    with pytest.raises(ValueError):
        arrival_gaps(5, 1.0, 0.0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return load_tokenizer(str(d))


def test_random_prompts(tokenizer: object) -> None:
    reqs = random_requests(tokenizer, 50, input_len=10, output_len=8, range_ratio=0.5, seed=0)
    assert reqs == random_requests(tokenizer, 50, 10, 8, 0.5, seed=0)
    assert all(5 <= r.prompt_len <= 15 and 4 <= r.output_len <= 12 for r in reqs)
    assert len({r.output_len for r in reqs}) > 3
    assert not any("<|im_end|>" in r.prompt for r in reqs)  # no special tokens
    fixed = random_requests(tokenizer, 5, input_len=7, output_len=3, range_ratio=0.0, seed=1)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(7, 3)}
    shared = random_requests(tokenizer, 6, 5, 3, 0.0, seed=2, prefix_len=12)
    assert {r.prompt_len for r in shared} == {17}
    words = [r.prompt.split() for r in shared]
    assert all(w[:12] == words[0][:12] for w in words)  # one system prompt for all
    assert len({" ".join(w[12:]) for w in words}) == 6


def test_jsonl_prompts(tmp_path: Path, tokenizer: object) -> None:
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": "hello world", "output_len": 3}', "", '"the cat"', '"a dog"']
    path.write_text("\n".join(lines))
    reqs = jsonl_requests(str(path), tokenizer, output_len=9, n=2)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [
        ("hello world", 2, 3),
        ("the cat", 2, 9),
    ]
    path.write_text("[1, 2]\n")
    with pytest.raises(BenchError, match=r"p\.jsonl:1"):
        jsonl_requests(str(path), tokenizer, 9, 2)
    with pytest.raises(BenchError, match="cannot read"):
        jsonl_requests(str(tmp_path / "missing.jsonl"), tokenizer, 9, 2)


def test_sharegpt_prompts_are_filtered(tmp_path: Path, tokenizer: object) -> None:
    def conv(human: str, gpt: str) -> dict:
        return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}

    data = [
        conv("the cat is on the mat", "a dog is up the red moon"),
        conv("hi", "the cat is on the mat"),  # prompt shorter than 4 tokens: dropped
        {"conversations": [{"from": "human", "value": "alone"}]},  # no reply: dropped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(str(path), tokenizer, n=10, output_len=None, seed=0)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(6, 7)]
    assert sharegpt_requests(str(path), tokenizer, 10, output_len=5, seed=0)[0].output_len == 5


def test_report_layout_and_json_keys() -> None:
    results = _results()
    m = compute_metrics(results, 2.0, [90.0, 99.9], parse_goodput(["ttft:250"]))
    info = RunInfo("openai-completions", "http://x", "m", None, "random", 5, math.inf, 1.0, 2)
    text = format_report(m, info)
    assert "Failed requests:                         2" in text
    assert "P99.9 TPOT (ms):" in text and "Request goodput (req/s):" in text
    data = json.loads(json.dumps(result_dict(m, info, results)))  # strict JSON: no inf
    assert data["request_rate"] == "inf"
    assert data["p90_ttft_ms"] == pytest.approx(280)
    assert data["errors_by_kind"] == {"HTTP 500": 1, "connection": 1}
    assert data["output_lens"][:3] == [5, 3, 1] and len(data["itls"]) == 5


def test_agreement(tokenizer: object) -> None:
    ref = ["the cat is red", "a dog", ""]
    same = agreement(ref, ref, tokenizer)
    assert same == {"agreement_exact": 1.0, "agreement_prefix": 1.0}
    other = agreement(ref, ["the cat is blue", "a dog", "hello"], tokenizer)
    assert other["agreement_exact"] == pytest.approx(1 / 3)
    assert other["agreement_prefix"] == pytest.approx((3 / 4 + 1 + 0) / 3)


def test_token_flops_count_every_linear_weight_twice(tiny_hf: tuple) -> None:
    """2 FLOPs per weight of every linear map; the LM head (tied: the embedding) only for a
    generated token — checked against the model's own parameter tensors."""
    from benchmarks.gemm_peak import token_flops
    from model.checkpoint import load_model

    model = load_model(tiny_hf[0])
    linear = sum(w.numel() for w in model.weights.values())
    prompt, output = token_flops(model.config.arch)
    assert prompt == 2 * linear
    assert output == 2 * (linear + model.embed.numel())


def test_peaks_count_per_whole_second_as_vllm_does() -> None:
    """Chunk arrivals and requests in flight bucketed by whole seconds from the first start."""
    results = [
        RequestResult(success=True, start=0.2, ttft=0.5, latency=1.0, itl=[0.1, 0.1, 0.25]),
        RequestResult(success=True, start=0.9, ttft=0.2, latency=0.3, itl=[0.05]),
        RequestResult(success=True, start=2.5, ttft=0.1, latency=0.2, itl=[]),
        RequestResult(success=False, start=0.0, error="timeout"),
    ]
    # arrivals: 0.7 0.8 0.9 | 1.15 1.1 1.15 | 2.6 -> seconds 0: 3, 1: 3, 2: 1
    # in flight: r0 in 0-1, r1 in 0-1, r2 in 2 (t0 = 0.0, the failed request's start)
    assert peaks(results) == (3.0, 2)
    assert peaks([]) == (0.0, 0)
