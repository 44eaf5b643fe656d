"""Calibration and held-out data for conversion, and ``loopserve convert`` end to end.

The evaluation must never see calibration data: the shipped prompt sets are disjoint from
each other, from the uptraining prompts and from the built-in evaluation text. Self-distilled
samples come from a batched, cached sampler that agrees with the greedy oracle.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config, write_hf_model
from server_support import write_tiny_tokenizer
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import model.calibration_data as cd
from loopserve.cli import main
from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.fidelity import eval_text
from model.generate import greedy_generate, nucleus_sample, sample_continuations
from model.recursive import RecursiveLM
from tests.test_families import tinyllama_config, write_gemma3, write_neox

torch.set_num_threads(1)


def test_prompt_sets_are_disjoint_from_each_other_and_every_evaluation_text() -> None:
    calib = cd.builtin_prompts(cd.CALIBRATION_PROMPTS)
    held = cd.builtin_prompts(cd.HELDOUT_PROMPTS)
    training = resources.files("training").joinpath("data/prompts.txt").read_text()
    train = {line.strip() for line in training.splitlines() if line.strip()}
    assert len(calib) >= 50 and len(held) >= 50
    assert not set(calib) & set(held)
    assert not (set(calib) | set(held)) & train
    text = eval_text()
    assert not [p for p in calib + held if p in text]


def test_batched_sampler_at_low_temperature_is_greedy(tiny_hf: tuple[Path, object]) -> None:
    model = load_model(tiny_hf[0])
    prompts = [[5, 6, 7, 8, 9], [3], [10, 11, 12]]  # ragged: left padding must not leak
    gen = torch.Generator().manual_seed(0)
    got = sample_continuations(model, prompts, 10, gen, temperature=1e-6, top_p=1.0)
    assert got == [greedy_generate(model, p, 10) for p in prompts]


def _sorted_nucleus(
    logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float
) -> torch.Tensor:
    """The reference draw: sort the whole vocabulary, keep the smallest prefix reaching top_p."""
    probs = (logits.double() / temperature).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, pick)[:, 0]


@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
@pytest.mark.parametrize(
    "shape",
    [
        "peaked",  # a served model's spread: a few hundred candidates of 262k
        "flat",  # a nucleus of most of the vocabulary
        "ties",  # equal probabilities inside the nucleus: a subset sorts them unlike the whole
    ],
)
def test_nucleus_sample_draws_what_the_full_sort_draws(shape: str, top_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 262_144 if shape == "peaked" else 3001
    logits = torch.randn(6, vocab, generator=gen) * {"peaked": 4.0, "flat": 0.1, "ties": 1.0}[shape]
    if shape == "ties":
        logits = (logits * 4).round() / 4
    for seed in range(4):
        ours, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got = nucleus_sample(logits, ours, 0.7, top_p)
        assert torch.equal(got, _sorted_nucleus(logits, ref, 0.7, top_p))
        assert torch.equal(ours.get_state(), ref.get_state())  # later draws agree as well


@torch.no_grad()
def _cache_free_samples(
    model: RecursiveLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    generator: torch.Generator,
    eos: tuple[int, ...],
) -> list[list[int]]:
    """The sampler's contract without a cache or padding: every row re-run whole each step."""
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = torch.cat([model(torch.tensor([s]))[:, -1] for s in seqs])
        tokens = _sorted_nucleus(logits, generator, 1.0, 0.95).tolist()
        for i, tok in enumerate(tokens):
            seqs[i].append(tok)
            if not done[i]:
                outs[i].append(tok)
                done[i] = tok in eos
        if all(done):
            break
    return outs


def _write_qwen2(d: Path) -> None:
    cfg = Qwen2Config(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.08) if not name.endswith("norm.weight") else p.fill_(1.1)
    hf.eval().save_pretrained(d)


WRITERS = {
    "llama": lambda d: write_hf_model(d, tiny_llama_config()),
    "tinyllama": lambda d: write_hf_model(d, tinyllama_config()),
    "qwen2": _write_qwen2,
    "neox": write_neox,
    "gemma3": write_gemma3,  # sliding windows of 5: the prompts are longer
}


@pytest.mark.parametrize("loops", [1, 2])
@pytest.mark.parametrize("family", sorted(WRITERS))
def test_cached_sampler_equals_the_cache_free_reference(
    tmp_path: Path, family: str, loops: int
) -> None:
    """Same seed, same tokens, in float64: the padded, cached batch may round unlike the
    cache-free rows in float32 and move a draw that lies on a nucleus or multinomial edge.
    At loops = 2 a relaxed conversion, whose depths differ in deltas (and Gemma's windows)."""
    WRITERS[family](tmp_path)
    model = load_model(tmp_path, dtype=torch.float64)
    if loops > 1:
        ranks = dict.fromkeys(LINEAR_MODULES, 4)
        model = convert(model, loops, "average", ranks, progress=False)[0].eval()
    vocab = model.config.arch.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 1, 14, 6)]
    eos = (int(torch.randint(3, vocab, (1,), generator=gen)),)
    want = _cache_free_samples(model, prompts, 12, torch.Generator().manual_seed(7), eos)
    got = sample_continuations(
        model, prompts, 12, torch.Generator().manual_seed(7), eos_token_ids=eos
    )
    assert got == want


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_with_tokenizer")
    write_hf_model(d, tiny_llama_config())
    write_tiny_tokenizer(d)
    return d


def test_self_distilled_samples_are_cached_and_disjoint_from_held_out(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_model(tiny_src)
    tok = AutoTokenizer.from_pretrained(str(tiny_src))
    calib = cd.self_distilled(source, tiny_src, tok, cd.CALIBRATION_PROMPTS, 600, 0, tmp_path)
    assert sum(map(len, calib)) >= 600 - len(calib)
    held = cd.self_distilled(source, tiny_src, tok, cd.HELDOUT_PROMPTS, 600, 1000, tmp_path)
    assert not {tuple(s) for s in calib} & {tuple(s) for s in held}

    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("a cached set was generated again")

    monkeypatch.setattr(cd, "sample_continuations", refuse)
    again = cd.self_distilled(source, tiny_src, tok, cd.CALIBRATION_PROMPTS, 600, 0, tmp_path)
    assert again == calib


def test_convert_cli_calibrates_and_reports_both_evaluation_sets(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LOOPSERVE_HOME", str(tmp_path / "home"))
    out, report = tmp_path / "rrt", tmp_path / "report.json"
    argv = ["convert", str(tiny_src), "--loops", "3", "--rank", "4", "--rank-at", "0=full"]
    argv += ["--self-distill", "512", "--out", str(out), "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "deltas=sequential" in printed and "fidelity (held-out samples):" in printed
    data = json.loads(report.read_text())
    assert data["fidelity_heldout"]["tokens"] >= 4096
    assert data["report"]["calibration_tokens"] >= 256
    assert data["report"]["position_ranks"]["q"][0] == 48
    meta = json.loads((out / "loopserve.json").read_text())["provenance"]
    assert meta["method"] == "sequential" and meta["fidelity_heldout"] is not None
    model = load_model(out)
    assert model.config.recursion.ranks["q"] == 48


def test_calibration_overlapping_an_evaluation_set_is_refused(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("LOOPSERVE_HOME", str(tmp_path / "home"))
    source = load_model(tiny_src)
    tok = AutoTokenizer.from_pretrained(str(tiny_src))
    held = cd.heldout_samples(source, tiny_src, tok, progress=False)
    held_words = tok.decode(held[3], skip_special_tokens=True).split()
    own = "Calibration prose of its own, about tide pools, kelp and the crabs that hide in them."
    chat = {"messages": [{"role": "user", "content": own}, {"role": "assistant", "content": own}]}
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"text": own * 3}) + "\n" + json.dumps(chat) + "\n")
    windows = cd.calibration_windows(source, tiny_src, tok, clean, seq_len=8, progress=False)
    assert windows.shape[0] > 0  # the chat template's own words do not count as overlap

    copied = {
        "the built-in evaluation text": "Notes. " + " ".join(eval_text().split()[200:214]),
        "the held-out set": " ".join(held_words[10:24]) + " and more.",
    }
    for name, text in copied.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": own}) + "\n" + json.dumps({"text": text}) + "\n")
        with pytest.raises(cd.CalibrationError, match=f"bad.jsonl:2: .*13 words with {name}"):
            cd.calibration_windows(source, tiny_src, tok, bad, seq_len=8, progress=False)
    # twelve words are not an overlap; without evaluation the held-out set is not checked
    near = tmp_path / "near.txt"
    near.write_text(" ".join(eval_text().split()[200:212]) + " " + copied["the held-out set"])
    cd.calibration_windows(source, tiny_src, tok, near, seq_len=8, progress=False, heldout=False)

    argv = ["convert", str(tiny_src), "--loops", "3", "--rank", "4", "--calibration", str(bad)]
    assert main([*argv, "--out", str(tmp_path / "rrt")]) == 2
    err = capsys.readouterr().err
    assert "must not overlap an evaluation set" in err and "held-out set" in err
    assert not (tmp_path / "rrt").exists()
