"""Learned exit heads: training lowers held-out KL to the final loop (recomputed here from the
heads' raw weights), per-row application equals per-depth application, and checkpoints round
trip with and without heads (old configs, without the field, still load)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import (
    EXIT_HEADS_FILE,
    LOOPSERVE_CONFIG,
    load_model,
    save_checkpoint,
    save_exit_heads,
)
from model.config import LINEAR_MODULES
from model.convert import convert
from model.exit_heads import ExitHeads
from model.recursive import RecursiveLM
from training.exit_heads import HeadTraining, loop_states, train_exit_heads


def _rrt(tiny_dir: Path) -> RecursiveLM:
    model, _ = convert(
        load_model(tiny_dir), 3, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )
    return model.eval()


def _random_heads(model: RecursiveLM, seed: int = 0, scale: float = 0.3) -> ExitHeads:
    h = model.config.arch.hidden_size
    heads = ExitHeads(model.config.loops - 1, h, dtype=model.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.weight.add_(scale * torch.randn(heads.weight.shape, generator=gen) / h**0.5)
        heads.bias.add_(scale * torch.randn(heads.bias.shape, generator=gen))
    return heads.requires_grad_(False)


def _kl_to_final(model: RecursiveLM, ids: torch.Tensor, heads: ExitHeads | None) -> list[float]:
    """KL(final loop ‖ loop b's exit) per early depth, the head applied as h Wᵀ + bias."""
    with torch.no_grad():
        states = [h.flatten(0, 1) for h in model.loop_hidden_states(ids)]
        final = model.logits(states[-1]).log_softmax(-1)
        out = []
        for b, h in enumerate(states[:-1]):
            if heads is not None:
                h = h @ heads.weight[b].T + heads.bias[b]
            logp = model.logits(h).log_softmax(-1)
            out.append(float(F.kl_div(logp, final, log_target=True, reduction="batchmean")))
    return out


def test_trained_heads_lower_heldout_kl_to_the_final_loop(tiny_hf: tuple) -> None:
    model = _rrt(tiny_hf[0])
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 101, (64, 64), generator=gen)
    held = torch.randint(0, 101, (16, 64), generator=gen)
    config = HeadTraining(steps=150, batch_tokens=256, lr=3e-3, progress=False)
    heads, report = train_exit_heads(
        model, loop_states(model, train), loop_states(model, held), config
    )
    assert report.steps == 150 and report.train_tokens == train.numel()
    before, after = _kl_to_final(model, held, None), _kl_to_final(model, held, heads)
    torch.testing.assert_close(report.kl_before, before, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(report.kl_after, after, rtol=1e-4, atol=1e-6)
    for b in range(2):
        assert after[b] < 0.8 * before[b], (b, before, after)
    # the gates' held-out cross-entropy on "this exit's token is the final loop's"
    with torch.no_grad():
        states = [x.flatten(0, 1) for x in model.loop_hidden_states(held)]
        final = model.logits(states[-1]).argmax(-1)
        for b in range(2):
            exit_token = model.logits(states[b] @ heads.weight[b].T + heads.bias[b]).argmax(-1)
            label = (exit_token == final).float()
            x = states[b] / states[b].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            logit = x @ heads.gate_weight[b] + heads.gate_bias[b]
            bce = F.binary_cross_entropy_with_logits(logit, label)
            assert report.gate_bce[b] == pytest.approx(float(bce), rel=1e-4)
            rate = float(label.mean())
            constant = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
            assert report.constant_bce[b] == pytest.approx(constant, rel=1e-6)
    assert all(not p.requires_grad for p in heads.parameters())
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def test_per_row_depths_equal_per_depth_application(tiny_hf: tuple) -> None:
    model = _rrt(tiny_hf[0])
    heads = _random_heads(model)
    x = torch.randn(7, model.config.arch.hidden_size)
    depths = [2, 0, 1, 1, 0, 2, 1]
    got = heads(x, depths)
    for i, d in enumerate(depths):
        want = x[i] if d == 2 else x[i] @ heads.weight[d].T + heads.bias[d]
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(heads(x, 2), x)
    model.exit_heads, model.config = heads, replace(model.config, exit_heads=True)
    torch.testing.assert_close(model.exit_logits(x, depths)[1], model.logits(got[1]))


def test_checkpoint_round_trip_with_and_without_heads(tiny_hf: tuple, tmp_path: Path) -> None:
    model = _rrt(tiny_hf[0])
    plain = save_checkpoint(model, tmp_path / "plain")
    assert not (plain / EXIT_HEADS_FILE).exists()
    meta = json.loads((plain / LOOPSERVE_CONFIG).read_text())
    del meta["config"]["exit_heads"]  # a checkpoint written before heads existed
    (plain / LOOPSERVE_CONFIG).write_text(json.dumps(meta))
    loaded = load_model(plain)
    assert loaded.exit_heads is None and not loaded.config.exit_heads
    x = torch.randn(5, model.config.arch.hidden_size)
    torch.testing.assert_close(loaded.exit_logits(x, 0), loaded.logits(x))

    model.exit_heads, model.config = _random_heads(model), replace(model.config, exit_heads=True)
    d = save_checkpoint(model, tmp_path / "heads")
    assert (d / EXIT_HEADS_FILE).exists()
    again = load_model(d)
    assert again.exit_heads is not None
    torch.testing.assert_close(again.exit_heads.weight, model.exit_heads.weight)
    torch.testing.assert_close(
        again.exit_logits(x, [0, 1, 2, 1, 0]), model.exit_logits(x, [0, 1, 2, 1, 0])
    )

    # calibration's path: heads added to a plain checkpoint without rewriting its weights
    loaded.exit_heads = _random_heads(loaded, seed=1)
    save_exit_heads(loaded, plain)
    meta["config"]["exit_heads"] = True
    (plain / LOOPSERVE_CONFIG).write_text(json.dumps(meta))
    torch.testing.assert_close(load_model(plain).exit_heads.bias, loaded.exit_heads.bias)
