"""The memory-lean distillation loss equals the reference, and the exit weight ramps in.

``chunked_distill_loss`` must give the reference ``distill_loss``'s loss, parts and gradients
(float64, so only summation order differs) for every chunk size, with and without the exit
term, with a temperature, and for tied and untied LM heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.recursive import RecursiveLM
from tests.conftest import tiny_llama_config, write_hf_model
from training.loss import LossWeights, chunked_distill_loss, distill_loss, part_names
from training.uptrain import UptrainConfig, Uptrainer, mark_trainable, student_loss


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models(directory: Path, tied: bool) -> tuple[RecursiveLM, RecursiveLM]:
    write_hf_model(directory, tiny_llama_config(tie_word_embeddings=tied))
    teacher = load_model(directory).double()
    ranks = dict.fromkeys(LINEAR_MODULES, 2)
    student = convert(teacher, loops=3, init="average", ranks=ranks, progress=False)[0]
    return teacher, student.double()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RecursiveLM, RecursiveLM]:
    return _models(tmp_path_factory.mktemp("teacher"), request.param)


def _grads(student: RecursiveLM, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    student.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize(
    "weights",
    [LossWeights(), LossWeights(ce=0.3, exit_kd=0.2, exit_ce=0.05, temperature=2.0),
     LossWeights(exit_kd=0.0, exit_ce=0.0)],
    ids=["default", "temperature", "no-exit"],
)  # fmt: skip
def test_chunked_loss_and_gradients_equal_the_reference(
    models: tuple[RecursiveLM, RecursiveLM], chunk: int, weights: LossWeights
) -> None:
    teacher, student = models
    groups = ("shared", "lora", "norms", "embeddings")  # the head's weights get gradients too
    mark_trainable(student, groups)
    ids = torch.randint(0, 101, (3, 19), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        t_hidden = teacher.loop_hidden_states(ids)[-1]
    ref_loss, ref_parts = distill_loss(
        student.loop_hidden_states(ids), student.logits, teacher.logits(t_hidden), ids, weights
    )
    expected = _grads(student, ref_loss)
    flat_teacher = t_hidden.flatten(0, 1)
    loss, parts = chunked_distill_loss(
        student.loop_hidden_states(ids),
        student.logits,
        list(student.parameters()),
        lambda rows: teacher.logits(flat_teacher[rows]),
        ids,
        weights,
        chunk,
    )
    got = _grads(student, loss)
    assert len(parts) == len(part_names(3, weights)) == len(ref_parts)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-12, atol=1e-12)
    assert set(got) == set(expected)
    assert {"final_norm", "embed"} <= set(got)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_student_loss_paths_agree(models: tuple[RecursiveLM, RecursiveLM]) -> None:
    """What the trainer calls: ``loss_chunk`` 0 (reference) and > 0 give the same loss."""
    teacher, student = models
    mark_trainable(student, ("shared", "lora", "norms"))
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    weights = LossWeights()
    with torch.no_grad():
        t_hidden = teacher.loop_hidden_states(ids)[-1]
    ref, ref_parts = student_loss(student, teacher, t_hidden, ids, weights, 0)
    got, parts = student_loss(student, teacher, t_hidden, ids, weights, 5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-12, atol=1e-12)


def _config(**kw: object) -> UptrainConfig:
    base: dict[str, object] = {
        "steps": 10,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 0,
        "eval_every": 1000,
        "checkpoint_every": 0,
        "device": "cpu",
        "progress": False,
    }
    base.update(kw)
    return UptrainConfig(**base)


def test_exit_weight_ramps_up_from_zero() -> None:
    cfg = _config(exit_kd_weight=0.2, exit_ce_weight=0.1, exit_warmup_steps=4)
    ramp = [cfg.loss_weights(step) for step in range(6)]
    assert [w.exit_kd for w in ramp] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert [w.exit_ce for w in ramp] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    assert all(w.kd == 1.0 for w in ramp)
    assert _config(exit_kd_weight=0.2).loss_weights(0).exit_kd == 0.2  # no ramp by default
    with pytest.raises(ValueError, match="exit_warmup_steps"):
        _config(exit_warmup_steps=-1)


def test_ramped_first_step_trains_as_if_the_exit_term_were_off(tmp_path: Path) -> None:
    """Step 0 of a ramp has exit weight 0: the same update as a run without the exit term,
    and not the update of an unramped run."""
    teacher, student = _models(tmp_path, tied=True)
    teacher, student = teacher.float(), student.float()
    windows = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0))

    def first_step(**kw: object) -> dict[str, torch.Tensor]:
        ranks = dict.fromkeys(LINEAR_MODULES, 2)
        s = convert(teacher, loops=3, init="average", ranks=ranks, progress=False)[0]
        Uptrainer(s, teacher, windows, windows[:2], _config(**kw)).train_step()
        return {k: v.clone() for k, v in s.state_dict().items()}

    ramped = first_step(exit_kd_weight=0.1, exit_ce_weight=0.1, exit_warmup_steps=5)
    off = first_step(exit_kd_weight=0.0, exit_ce_weight=0.0)
    on = first_step(exit_kd_weight=0.1, exit_ce_weight=0.1)
    assert all(torch.equal(ramped[k], off[k]) for k in off)
    assert not all(torch.equal(ramped[k], on[k]) for k in on)
