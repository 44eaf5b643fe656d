"""``loopserve bench serve``: load-test any OpenAI-compatible server and report in vLLM's
conventions. A run always finishes: failures are counted, the exit status stays 0.

Flags and result keys follow ``vllm bench serve``: its spellings are accepted (``--dataset-name``,
``--random-input-len``, ``--random-output-len``, ``--random-range-ratio``,
``--random-prefix-len``, ``--metric-percentiles``, ``--backend``), ``--save-result`` is a
switch that writes to ``--result-dir``/``--result-filename`` under vLLM's default name, and the
JSON has its keys
(``start_times``, ``latencies``, ``label``, ``max_output_tokens_per_s``,
``max_concurrent_requests``). Where it differs: without ``--tokenizer`` the tokenizer is the
model directory the server names in ``/v1/models`` (``root``) when that directory is readable
here; datasets are random, JSONL and ShareGPT only; failures are counted by kind
(``errors_by_kind``); ``--plot`` and ``--max-duration`` are loopserve's own.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
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
from benchmarks.client.report import (
    RunInfo,
    format_report,
    result_dict,
    result_path,
    save_result,
)
from benchmarks.client.runner import LoadConfig, run_load
from benchmarks.client.streaming import APIS, Endpoint, first_card, first_model

DATASETS = ("random", "jsonl", "sharegpt")
BACKENDS = {"vllm": "completions", "openai": "completions", "openai-chat": "chat"}
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
    opt(
        "--dataset",
        "--dataset-name",
        choices=DATASETS,
        default="random",
        help="prompt source (default: random)",
    )
    opt("--dataset-path", help="the JSONL or ShareGPT JSON file")
    opt("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    opt(
        "--input-len",
        "--random-input-len",
        type=int,
        default=256,
        help="random prompt tokens (default: 256)",
    )
    opt(
        "--output-len",
        "--random-output-len",
        type=int,
        help=f"tokens to ask for (default: {DEFAULT_OUTPUT_LEN}; "
        "ShareGPT: the recorded reply's length)",
    )
    opt(
        "--random-prefix-len",
        type=int,
        default=0,
        help="random prompts: a prefix of this many tokens shared by all (default: 0)",
    )
    opt(
        "--range-ratio",
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="random lengths uniform in len·[1−r, 1+r] (default: 0)",
    )
    opt("--ignore-eos", action="store_true", help="ask the server to run to max_tokens")
    opt("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    opt("--seed", type=int, default=0, help="seed of prompts and arrivals (default: 0)")
    opt(
        "--percentiles",
        "--metric-percentiles",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = p.add_argument
    opt("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    opt("--model", help="model name to request (default: the first the server lists)")
    opt(
        "--tokenizer",
        help="local tokenizer directory (default: the model directory the server's "
        "/v1/models names, if readable here; random and ShareGPT prompts need one)",
    )
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
    opt(
        "--backend",
        choices=tuple(BACKENDS),
        help="vLLM's spelling of --api: vllm / openai = completions, openai-chat = chat",
    )
    opt("--save-result", action="store_true", help="write the result JSON (vLLM's keys)")
    opt("--result-dir", help="folder of the result JSON (default: the current one)")
    opt(
        "--result-filename",
        help="its name (default: vLLM's, {label or backend}-{rate}qps-{model}-{date}.json)",
    )
    opt("--label", help="the run's name in the result JSON and the default file name")
    opt("--plot", metavar="FILE.png", help="write latency CDFs and ITL over time")
    p.set_defaults(func=run_serve)


def build_requests(args: argparse.Namespace, tokenizer: Any) -> list[SampleRequest]:
    """The dataset ``args`` name, ``--num-prompts`` long (shorter if the file is)."""
    if args.num_prompts < 1:
        raise BenchError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    out_len = args.output_len or DEFAULT_OUTPUT_LEN
    if args.dataset == "random":
        if tokenizer is None:
            raise BenchError(
                "random prompts need --tokenizer DIR (the server names no model directory "
                "readable here)"
            )
        if args.random_prefix_len < 0:
            raise BenchError(f"--random-prefix-len must be >= 0, got {args.random_prefix_len}")
        return random_requests(
            tokenizer,
            args.num_prompts,
            args.input_len,
            out_len,
            args.range_ratio,
            args.seed,
            args.random_prefix_len,
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


def server_tokenizer(base_url: str, api_key: str | None) -> Any:
    """The tokenizer of the model directory the server names in ``/v1/models`` (its
    ``root``), when that is a directory on this machine; else None."""
    try:
        card = asyncio.run(first_card(base_url, api_key))
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None
    root = card.get("root")
    if not isinstance(root, str) or not Path(root).is_dir():
        return None
    try:
        return load_tokenizer(root)
    except BenchError:
        return None


def run_serve(args: argparse.Namespace) -> int:
    if args.backend is not None:
        args.api = BACKENDS[args.backend]
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
    if tokenizer is None and args.dataset != "jsonl":
        tokenizer = server_tokenizer(args.base_url, args.api_key)
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
        label=args.label,
    )
    print(format_report(metrics, info))
    if args.save_result:
        data = result_dict(metrics, info, outcome.results)
        path = result_path(info, args.result_dir, args.result_filename, data["date"])
        save_result(path, data)
    if args.plot:
        plot_run(outcome.results, args.plot, f"{endpoint.model} @ {args.base_url}")
    return 0
