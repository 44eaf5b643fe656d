"""Data-parallel uptraining under torchrun (two gloo processes on the CPU, tiny random model).

One torchrun job runs this file as its script (``__main__`` below): for DDP and for FSDP2 it
trains four steps straight, then the same four with a stop, a checkpoint and a resume after
step two. The test compares against one process with the same global batch: the same loss
curve and final weights (within floating-point tolerance), FSDP2 the same as DDP, and a resume
equal to the uninterrupted run bit for bit. A second job runs ``training.cli uptrain`` itself
under torchrun and must write the checkpoint a single-process run writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, STOP = 4, 2
STRATEGIES = ("ddp", "fsdp")


def _config(strategy: str = "ddp") -> Any:
    from training.uptrain import UptrainConfig

    # 12 windows, global batch 4, accumulation 2: the data wraps into a new epoch mid-run; the
    # exit weight ramps in; an odd loss chunk leaves a ragged last chunk.
    return UptrainConfig(
        steps=STEPS,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=1,
        exit_warmup_steps=2,
        loss_chunk=7,
        eval_every=1000,
        checkpoint_every=0,
        device="cpu",
        progress=False,
        strategy=strategy,
    )


def _trainer(work: Path, strategy: str = "ddp") -> Any:
    from model.checkpoint import load_model
    from training.uptrain import Uptrainer

    windows = torch.load(work / "windows.pt")
    return Uptrainer(
        load_model(work / "student"),
        load_model(work / "teacher"),
        windows[:12],
        windows[12:],
        _config(strategy),
    )


def _scenario(work: Path, strategy: str, rank: int) -> dict[str, Any]:
    """Losses and final weights of a straight run and of a run stopped and resumed."""
    straight = _trainer(work, strategy)
    losses = [straight.train_step().parts["loss"] for _ in range(STEPS)]
    weights = straight.full_student_state()
    first = _trainer(work, strategy)
    resumed = [first.train_step().parts["loss"] for _ in range(STOP)]
    first.save_state(work / f"state_{strategy}.pt")
    torch.distributed.barrier()  # the file is written before any rank reads it
    second = _trainer(work, strategy)
    second.load_state(work / f"state_{strategy}.pt")
    resumed += [second.train_step().parts["loss"] for _ in range(STEPS - STOP)]
    return {
        "losses": losses,
        "weights": weights,
        "resumed_losses": resumed,
        "resumed_weights": second.full_student_state(),
        "tokens_seen": second.tokens_seen,
    }


def _worker(work: Path) -> None:
    """Run by torchrun: both strategies on this rank; rank 0 saves what it saw."""
    from training import distributed
    from training.uptrain import training_kernels

    torch.set_num_threads(1)
    ranks, _ = distributed.init_distributed("cpu")
    with training_kernels():
        results = {s: _scenario(work, s, ranks.rank) for s in STRATEGIES}
    if ranks.is_main:
        torch.save({"world_size": ranks.world_size, **results}, work / "results.pt")
    torch.distributed.destroy_process_group()


def _torchrun(*args: str, timeout: float = 240) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.checkpoint import load_model, save_checkpoint
    from model.config import LINEAR_MODULES
    from model.convert import convert
    from tests.conftest import tiny_llama_config, write_hf_model

    work = tmp_path_factory.mktemp("dist")
    write_hf_model(work / "teacher", tiny_llama_config(tie_word_embeddings=False))
    ranks = dict.fromkeys(LINEAR_MODULES, 2)
    teacher = load_model(work / "teacher")
    student = convert(teacher, loops=3, init="average", ranks=ranks, progress=False)[0]
    save_checkpoint(student, work / "student")
    gen = torch.Generator().manual_seed(0)
    torch.save(torch.randint(0, 101, (16, 24), generator=gen), work / "windows.pt")
    return work


@pytest.fixture(scope="module")
def single(work: Path) -> dict[str, Any]:
    from training.uptrain import training_kernels

    with training_kernels():
        trainer = _trainer(work)
        losses = [trainer.train_step().parts["loss"] for _ in range(STEPS)]
    return {"losses": losses, "weights": trainer.full_student_state()}


@pytest.fixture(scope="module")
def two_ranks(work: Path) -> dict[str, Any]:
    _torchrun(str(Path(__file__)), str(work))
    return torch.load(work / "results.pt", weights_only=False)


def _assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to summation order; Adam can turn a near-zero gradient's rounding into a
    difference of a few 1e-6 in one element, against steps of ~1e-3."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_two_processes_follow_the_single_process_run(
    two_ranks: dict[str, Any], single: dict[str, Any]
) -> None:
    assert two_ranks["world_size"] == 2
    ddp = two_ranks["ddp"]
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert len(set(ddp["losses"])) == STEPS  # it trained: every step's loss differs
    _assert_weights_close(ddp["weights"], single["weights"])
    moved = [n for n, w in single["weights"].items() if not torch.equal(w, ddp["weights"][n])]
    assert moved  # not vacuous: the compared weights are not the untouched start


def test_fsdp2_matches_ddp(two_ranks: dict[str, Any]) -> None:
    ddp, fsdp = two_ranks["ddp"], two_ranks["fsdp"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    _assert_weights_close(fsdp["weights"], ddp["weights"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_after_a_stop_is_bit_for_bit(two_ranks: dict[str, Any], strategy: str) -> None:
    run = two_ranks[strategy]
    assert run["resumed_losses"] == run["losses"]
    for name, w in run["weights"].items():
        assert torch.equal(run["resumed_weights"][name], w), name
    assert run["tokens_seen"] == STEPS * 2 * 4 * 24  # global tokens: accumulation × batch × S


def test_the_cli_runs_unchanged_under_torchrun(work: Path, tmp_path: Path) -> None:
    """``torchrun -m training.cli uptrain`` (rank 0 self-distils into the shared cache, the
    other rank reads it) writes the checkpoint one process writes with the same arguments."""
    from model.checkpoint import load_model
    from tests.test_uptrain import _char_tokenizer, _run

    _char_tokenizer(work / "teacher")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    args = [
        "uptrain", "--student", str(work / "student"), "--teacher", str(work / "teacher"),
        "--data", str(text), "--self-distill", "64", "--gen-len", "16", "--gen-batch", "4",
        "--self-distill-cache", str(tmp_path / "cache.jsonl"), "--seq-len", "24",
        "--batch-size", "4", "--grad-accum", "2", "--steps", "3", "--eval-every", "2",
        "--lr", "3e-3", "--warmup", "1", "--eval-windows", "2", "--exit-warmup", "2",
        "--loss-chunk", "13", "--device", "cpu", "--no-progress", "--no-plot",
    ]  # fmt: skip
    _torchrun("-m", "training.cli", *args, "--out", str(tmp_path / "two"))
    assert _run(*args, "--out", str(tmp_path / "one")) == 0
    two, one = load_model(tmp_path / "two"), load_model(tmp_path / "one")
    _assert_weights_close(two.state_dict(), one.state_dict())
    logs = [
        (tmp_path / d / "uptrain" / "eval.jsonl").read_text().splitlines() for d in ("one", "two")
    ]
    assert len(logs[0]) == len(logs[1]) == 3  # steps 0, 2, 3, written once (by rank 0)
    kl = [[json.loads(r)["kl"] for r in log] for log in logs]
    assert kl[1] == pytest.approx(kl[0], rel=1e-4)
    start = load_model(work / "student").state_dict()
    assert not torch.equal(start["weights.q"], one.state_dict()["weights.q"])  # it trained


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
