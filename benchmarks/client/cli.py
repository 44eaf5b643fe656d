"""``loopserve bench serve``: load-test any OpenAI-compatible server and report in vLLM's
conventions. A run always finishes: failures are counted, the exit status stays 0."""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any

import httpx

from benchmarks.client.datasets import (
    BenchError,
    SampleRequest,
    jsonl_requests,
    load_tokenizer,
    random_requests,
    sharegpt_requests,
)
from benchmarks.client.metrics import compute_metrics, parse_goodput
from benchmarks.client.plot import plot_run
from benchmarks.client.report import RunInfo, format_report, result_dict, save_result
from benchmarks.client.runner import LoadConfig, run_load
from benchmarks.client.streaming import APIS, Endpoint, first_model

DATASETS = ("random", "jsonl", "sharegpt")
DEFAULT_OUTPUT_LEN = 128


def _percentiles(value: str) -> list[float]:
    try:
        ps = [float(p) for p in value.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers, got {value!r}") from None
    if any(not 0 <= p <= 100 for p in ps):
        raise argparse.ArgumentTypeError(f"percentiles lie in [0, 100], got {value!r}")
    return ps


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``bench serve`` and ``bench compare`` share: dataset, sampling, limits."""
    opt = p.add_argument
    opt("--api", choices=APIS, default="completions", help="endpoint kind (default: completions)")
    opt("--api-key", help="sent as 'Authorization: Bearer KEY'")
    opt("--dataset", choices=DATASETS, default="random", help="prompt source (default: random)")
    opt("--dataset-path", help="the JSONL or ShareGPT JSON file")
    opt("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    opt("--input-len", type=int, default=256, help="random prompt tokens (default: 256)")
    opt(
        "--output-len",
        type=int,
        help=f"tokens to ask for (default: {DEFAULT_OUTPUT_LEN}; "
        "ShareGPT: the recorded reply's length)",
    )
    opt(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random lengths uniform in len·[1−r, 1+r] (default: 0)",
    )
    opt("--ignore-eos", action="store_true", help="ask the server to run to max_tokens")
    opt("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    opt("--seed", type=int, default=0, help="seed of prompts and arrivals (default: 0)")
    opt(
        "--percentiles",
        type=_percentiles,
        default=[90.0, 99.0],
        help="comma-separated percentiles to report (default: 90,99)",
    )
    opt(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:100 (names: ttft, tpot, e2el)",
    )
    opt("--timeout", type=float, default=600.0, help="per-request limit, s (default: 600)")
    opt("--max-duration", type=float, help="cut the whole run after this many seconds")
    opt("--disable-tqdm", action="store_true", help="no progress bar")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server",
        description=__doc__,
    )
    opt = p.add_argument
    opt("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    opt("--model", help="model name to request (default: the first the server lists)")
    opt("--tokenizer", help="local tokenizer directory (random and ShareGPT prompts need one)")
    opt(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second (default: inf, all at once)",
    )
    opt(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of arrival gaps: 1 Poisson, <1 burstier (default: 1)",
    )
    opt("--max-concurrency", type=int, help="most requests in flight at once")
    add_load_arguments(p)
    opt("--save-result", metavar="FILE.json", help="write the result JSON (vLLM's keys)")
    opt("--plot", metavar="FILE.png", help="write latency CDFs and ITL over time")
    p.set_defaults(func=run_serve)


def build_requests(args: argparse.Namespace, tokenizer: Any) -> list[SampleRequest]:
    """The dataset ``args`` name, ``--num-prompts`` long (shorter if the file is)."""
    if args.num_prompts < 1:
        raise BenchError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    out_len = args.output_len or DEFAULT_OUTPUT_LEN
    if args.dataset == "random":
        if tokenizer is None:
            raise BenchError("random prompts need --tokenizer DIR")
        return random_requests(
            tokenizer, args.num_prompts, args.input_len, out_len, args.range_ratio, args.seed
        )
    if not args.dataset_path:
        raise BenchError(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "jsonl":
        return jsonl_requests(args.dataset_path, tokenizer, out_len, args.num_prompts)
    if tokenizer is None:
        raise BenchError("ShareGPT prompts need --tokenizer DIR (to measure and filter them)")
    return sharegpt_requests(
        args.dataset_path, tokenizer, args.num_prompts, args.output_len, args.seed
    )


def endpoint_for(args: argparse.Namespace, base_url: str, model: str | None) -> Endpoint:
    """The endpoint, asking the server for its model name where none was given."""
    if model is None:
        try:
            model = asyncio.run(first_model(base_url, args.api_key))
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise BenchError(f"cannot list the models at {base_url}: {e}") from None
    return Endpoint(
        base_url=base_url,
        model=model,
        api=args.api,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout=args.timeout,
    )


def run_serve(args: argparse.Namespace) -> int:
    try:
        slos = parse_goodput(args.goodput)
        load = LoadConfig(
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            max_duration=args.max_duration,
            seed=args.seed,
            progress=not args.disable_tqdm,
        )
    except ValueError as e:
        raise BenchError(str(e)) from None
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    requests = build_requests(args, tokenizer)
    endpoint = endpoint_for(args, args.base_url, args.model)
    outcome = asyncio.run(run_load(endpoint, requests, load, tokenizer))
    metrics = compute_metrics(outcome.results, outcome.duration, args.percentiles, slos)
    info = RunInfo(
        backend=f"openai-{args.api}",
        base_url=args.base_url,
        model_id=endpoint.model,
        tokenizer_id=args.tokenizer,
        dataset=args.dataset,
        num_prompts=len(requests),
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
    )
    print(format_report(metrics, info))
    if args.save_result:
        save_result(args.save_result, result_dict(metrics, info, outcome.results))
    if args.plot:
        plot_run(outcome.results, args.plot, f"{endpoint.model} @ {args.base_url}")
    return 0
