"""Uptraining on tiny random models: KD recovers the teacher, the exit term trains the
intermediate loops, resume is bit-for-bit, an exact conversion stays exact, and the CLI runs
end to end (with a character tokenizer so text, JSONL and self-distillation all work)."""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model, save_checkpoint
from model.config import FULL_RANK, LINEAR_MODULES
from model.convert import convert
from model.recursive import RecursiveLM
from tests.conftest import tiny_llama_config, write_hf_model
from training.cli import add_calibrate_parser, add_uptrain_parser
from training.uptrain import (
    EvalResult,
    UptrainConfig,
    Uptrainer,
    UptrainError,
    mark_trainable,
    training_kernels,
)

VOCAB = 101


def _teacher(directory: Path) -> RecursiveLM:
    """A tiny untied Llama with its LM head scaled up so its predictions are peaked (a flat
    teacher would make every student look close)."""
    write_hf_model(directory, tiny_llama_config(tie_word_embeddings=False))
    teacher = load_model(directory)
    with torch.no_grad():
        teacher.lm_head.mul_(4.0)
    return teacher


def _student(teacher: RecursiveLM, loops: int = 3, rank: int = 2) -> RecursiveLM:
    ranks = dict.fromkeys(LINEAR_MODULES, rank)
    return convert(teacher, loops=loops, init="average", ranks=ranks, progress=False)[0]


def _config(**kw: object) -> UptrainConfig:
    base: dict[str, object] = {
        "steps": 200,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 10,
        "eval_every": 1000,
        "checkpoint_every": 0,
        "device": "cpu",
        "progress": False,
    }
    base.update(kw)
    return UptrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the CI machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _sample(model: RecursiveLM, n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences [n, length] sampled from ``model``: in-distribution text for a random model,
    where the next-token CE of the exit term means something (on uniform random tokens it
    only pulls the exit heads towards uniform)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 1), generator=gen)
    for _ in range(length - 1):
        probs = model(ids)[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[RecursiveLM, torch.Tensor, torch.Tensor]:
    teacher = _teacher(tmp_path_factory.mktemp("teacher"))
    return teacher, _sample(teacher, 64, 32, seed=0), _sample(teacher, 16, 32, seed=1)


@pytest.fixture(scope="module")
def kd_runs(setup: tuple) -> dict[float, tuple[EvalResult, EvalResult]]:
    """(before, after) held-out evaluations of 200 KD steps without and with the exit term."""
    teacher, train, held_out = setup
    runs = {}
    for weight in (0.0, 0.1):
        cfg = _config(exit_kd_weight=weight, exit_ce_weight=weight)
        trainer = Uptrainer(_student(teacher), teacher, train, held_out, cfg)
        before = trainer.evaluate()
        trainer.run()
        runs[weight] = (before, trainer.evaluate())
    return runs


def test_kd_halves_kl_on_held_out(kd_runs: dict) -> None:
    for before, after in kd_runs.values():
        assert before.kl > 1.0  # the untrained low-rank conversion is far from the teacher
        assert after.kl < 0.5 * before.kl, (before.kl, after.kl)
        assert after.agreement > before.agreement


def test_exit_term_raises_intermediate_agreement(kd_runs: dict) -> None:
    plain, with_exit = kd_runs[0.0][1], kd_runs[0.1][1]
    for b in range(len(plain.loop_agree_final) - 1):
        assert with_exit.loop_agree_final[b] > plain.loop_agree_final[b] + 0.1, (
            plain.loop_agree_final,
            with_exit.loop_agree_final,
        )
    assert with_exit.loop_kl[0] < plain.loop_kl[0]


def test_resume_is_bit_for_bit(setup: tuple, tmp_path: Path) -> None:
    teacher, train, held_out = setup
    # 12 windows / batch 4 / accumulation 2: the data wraps into a new epoch mid-run.
    cfg = _config(steps=8, batch_size=4, grad_accum=2, warmup_steps=2)
    train = train[:12]
    straight = Uptrainer(_student(teacher), teacher, train, held_out, cfg)
    expected = [straight.train_step().parts["loss"] for _ in range(8)]

    first = Uptrainer(_student(teacher), teacher, train, held_out, cfg)
    got = [first.train_step().parts["loss"] for _ in range(4)]
    first.save_state(tmp_path / "state.pt")
    second = Uptrainer(_student(teacher), teacher, train, held_out, cfg)
    second.load_state(tmp_path / "state.pt")
    got += [second.train_step().parts["loss"] for _ in range(4)]
    assert got == expected
    for (name, a), b in zip(
        straight.student.state_dict().items(), second.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_stop_step_ends_a_longer_schedule_and_probes_are_logged(
    setup: tuple, tmp_path: Path
) -> None:
    """A run stopped at step 3 of 6 is the first 3 steps of the 6-step run (not a 3-step
    schedule), and every evaluation logs each probe's measurement of the student."""
    teacher, train, held_out = setup
    cfg = _config(steps=6, warmup_steps=2, eval_every=2)
    straight = Uptrainer(_student(teacher), teacher, train, held_out, cfg)
    with training_kernels():  # as run() trains
        for _ in range(3):
            straight.train_step()
    seen: list[int] = []

    def probe(student: RecursiveLM) -> dict[str, float]:
        assert not student.training
        seen.append(len(seen))
        return {"weight": float(student.weights["q"].sum()), "call": seen[-1]}

    log = tmp_path / "eval.jsonl"
    stopped = Uptrainer(_student(teacher), teacher, train, held_out, cfg, log, {"q_sum": probe})
    summary = stopped.run(stop_step=3)
    assert summary.step == 3 and summary.stopped_early
    for (name, a), b in zip(
        straight.student.state_dict().items(), stopped.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]
    assert [r["q_sum"]["call"] for r in records] == [0, 1, 2]
    want = float(stopped.student.weights["q"].detach().sum())
    assert records[-1]["q_sum"]["weight"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(UptrainError, match="clash"):
        Uptrainer(_student(teacher), teacher, train, held_out, cfg, probes={"kl": probe})


def test_resume_refuses_changed_settings(setup: tuple, tmp_path: Path) -> None:
    teacher, train, held_out = setup
    trainer = Uptrainer(_student(teacher), teacher, train, held_out, _config(steps=2))
    trainer.save_state(tmp_path / "state.pt")
    other = Uptrainer(_student(teacher), teacher, train, held_out, _config(steps=2, lr=1e-3))
    with pytest.raises(UptrainError, match="lr"):
        other.load_state(tmp_path / "state.pt")


def test_full_rank_conversion_stays_exact(setup: tuple) -> None:
    """At an exact conversion the KD gradient is only float noise (which Adam still turns into
    steps of ~lr) and the exit term pulls the shared weights a little: a small LR keeps both
    negligible for the final loop."""
    teacher, train, held_out = setup
    for exit_weight in (0.0, 0.1):
        cfg = _config(steps=20, lr=1e-5, exit_kd_weight=exit_weight, exit_ce_weight=exit_weight)
        trainer = Uptrainer(_student(teacher, rank=FULL_RANK), teacher, train, held_out, cfg)
        assert trainer.evaluate().kl < 1e-9
        trainer.run()
        after = trainer.evaluate()
        assert after.kl < 1e-3, (exit_weight, after.kl)
        assert after.agreement > 0.97


def test_non_finite_gradient_stops_before_the_step(setup: tuple) -> None:
    teacher, train, held_out = setup
    student = _student(teacher)
    with torch.no_grad():
        student.lora_a["q"][0, 0, 0, 0] = float("inf")
    trainer = Uptrainer(student, teacher, train, held_out, _config(steps=2))
    before = student.weights["q"].detach().clone()
    with pytest.raises(UptrainError, match="non-finite gradient"):
        trainer.train_step()
    assert torch.equal(student.weights["q"], before)  # no optimizer step was taken


def test_trainable_groups(setup: tuple) -> None:
    student = _student(setup[0])
    mark_trainable(student, ("shared", "lora", "norms"))
    grads = {n: p.requires_grad for n, p in student.named_parameters()}
    assert not grads["embed"] and not grads["lm_head"]
    assert grads["weights.q"] and grads["lora_a.q"] and grads["final_norm"]
    mark_trainable(student, ("norms",))
    assert not student.weights["q"].requires_grad and student.input_norm.requires_grad


def test_schedule_and_validation() -> None:
    cfg = _config(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(100) == pytest.approx(0.1)
    assert cfg.lr_at(55) == pytest.approx(0.55)
    for bad in ({"steps": 0}, {"train_groups": ("bogus",)}, {"temperature": 0.0}):
        with pytest.raises(UptrainError):
            _config(**bad)


def _char_tokenizer(directory: Path) -> None:
    """Save a 101-entry character-level tokenizer with a chat template into ``directory``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for ch in string.printable[: VOCAB - 2]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(directory)


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopserve")
    sub = parser.add_subparsers(required=True)
    add_uptrain_parser(sub)
    add_calibrate_parser(sub)
    return parser


def _run(*argv: str) -> int:
    args = _cli().parse_args(list(argv))
    return args.func(args)


def test_cli_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPSERVE_HOME", str(tmp_path / "home"))  # the self-distilled cache
    teacher_dir, student_dir, out = tmp_path / "teacher", tmp_path / "student", tmp_path / "out"
    write_hf_model(teacher_dir, tiny_llama_config(max_position_embeddings=512))
    _char_tokenizer(teacher_dir)
    save_checkpoint(_student(load_model(teacher_dir)), student_dir, tokenizer_from=teacher_dir)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi there"}]})
        + "\n"
        + json.dumps({"text": "plain text record " * 20})
        + "\n"
    )
    common = [
        "uptrain", "--student", str(student_dir), "--teacher", str(teacher_dir),
        "--out", str(out), "--data", str(chat), "--self-distill", "120", "--gen-len", "16",
        "--gen-batch", "4", "--seq-len", "32", "--batch-size", "2", "--eval-every", "3",
        "--checkpoint-every", "3", "--eval-windows", "4", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert _run(*common, "--steps", "6") == 0
    assert "trained 6 steps" in capsys.readouterr().out
    cache = (out / "uptrain" / "self_distill.jsonl").read_text()
    assert _run(*common, "--steps", "6") == 2  # state exists: refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert _run(*common, "--steps", "8", "--resume") == 0
    assert (out / "uptrain" / "self_distill.jsonl").read_text() == cache  # not regenerated
    log = [json.loads(x) for x in (out / "uptrain" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 3, 6, 8]
    assert log[-1]["tokens_seen"] == 8 * 2 * 32
    assert (out / "uptrain" / "curve.png").stat().st_size > 0
    model = load_model(out)
    assert model.config.loops == 3
    provenance = json.loads((out / "loopserve.json").read_text())["provenance"]
    assert provenance["uptrain"]["step"] == 8

    calibrate = ["calibrate", "--model", str(out), "--seq-len", "32", "--tokens", "600"]
    assert _run(*calibrate, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "verified: coverage per depth" in printed and "held-out tokens" in printed
    record = json.loads((out / "loopserve.json").read_text())["provenance"]["calibration"]
    assert record["verified"]["prob"]["tokens"] >= 4096
    assert not (out / "exit_heads.safetensors").exists()
    assert _run(*calibrate, "--no-progress", "--exit-heads", "--head-steps", "4") == 0
    printed = capsys.readouterr().out
    assert "exit heads: 4 steps" in printed and "held-out KL to the final loop" in printed
    assert "exit gates: held-out cross-entropy" in printed and "  gate: thresholds" in printed
    record = json.loads((out / "loopserve.json").read_text())["provenance"]["calibration"]
    assert record["exit_heads"]["steps"] == 4 and record["fitted"]["prob"]["tokens"] < 600
    assert load_model(out).exit_heads is not None
    thresholds = load_model(out).config.exit_thresholds
    assert thresholds is not None and set(thresholds) == {"prob", "margin", "gate"}
    assert all(len(v) == 2 for v in thresholds.values())


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run("uptrain", "--student", "x", "--teacher", "y", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "no training data" in capsys.readouterr().err
    assert _run("calibrate", "--model", str(tmp_path)) == 2
    assert "not a loopserve checkpoint" in capsys.readouterr().err
