"""lm-evaluation-harness (``lm_eval --model local-completions``) against a live tiny-model
server, with the task files in tests/lm_eval_tasks/ and their local data (no hub): the
loglikelihoods it reads back equal a float64 cache-free forward of the model, and its
generate-until answers equal the model's greedy continuations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from server_support import LiveServer, write_tiny_rrt

from model.checkpoint import load_model
from model.generate import greedy_generate
from server.loader import load_tokenizer
from server.settings import ServeSettings

TASKS = Path(__file__).parent / "lm_eval_tasks"


def _docs() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "tiny.jsonl").read_text().splitlines()]


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = write_tiny_rrt(root)
    settings = ServeSettings(
        model=str(model_dir), served_model_name="tiny", block_size=4, max_model_len=128, threads=1
    )
    out = root / "out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with LiveServer(settings) as live:
        args = [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "local-completions",
            "--model_args",
            f"model=tiny,base_url={live.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={model_dir},num_concurrent=1,max_retries=1,tokenized_requests=True",
            "--tasks",
            "loopserve_tiny_ll,loopserve_tiny_gen",
            "--include_path",
            str(TASKS),
            "--output_path",
            str(out),
            "--log_samples",
        ]
        done = subprocess.run(
            args, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return model_dir, out


def test_loglikelihoods_equal_a_float64_forward(harness_run: tuple[Path, Path]) -> None:
    model_dir, out = harness_run
    model = load_model(model_dir, dtype=torch.float64)
    tok = load_tokenizer(model_dir)
    samples = _samples(out, "loopserve_tiny_ll")
    assert len(samples) == len(_docs())
    for doc, sample in zip(_docs(), samples, strict=True):
        ctx = tok(doc["context"])["input_ids"]
        want = []
        for choice in doc["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont]))[0].log_softmax(-1)
            want.append(sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont)))
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-3), doc


def test_generate_until_equals_greedy_continuations(harness_run: tuple[Path, Path]) -> None:
    model_dir, out = harness_run
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    for doc, sample in zip(_docs(), _samples(out, "loopserve_tiny_gen"), strict=True):
        ids = tok(doc["context"])["input_ids"]
        greedy = greedy_generate(model, ids, 4)
        text = tok.decode(greedy, skip_special_tokens=True)
        if tok.eos_token_id in greedy:
            text = tok.decode(greedy[: greedy.index(tok.eos_token_id)], skip_special_tokens=True)
        want = text.split(".")[0]
        assert sample["resps"][0][0] == want, doc
