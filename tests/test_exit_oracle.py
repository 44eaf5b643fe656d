"""Mixed early exits against a per-token oracle with explicit per-depth K/V lists.

The oracle decodes one token at a time, keeps every (depth, block layer) K/V as a Python list,
applies the exit rule after every loop and, when a token leaves at depth b, gives the depths it
skipped K/V by the fill policy: ``propagate`` (the K/V projections of its exit hidden state),
``copy`` (depth b's K/V) or ``ride`` (sequence-wise batching: the token keeps running every
loop, its sample taken at the exit depth). Later tokens attend to those K/V at every depth, so
the engine's tokens equal the oracle's only if the fills are right.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.exit_heads import ExitHeads
from model.recursive import RecursiveLM
from model.serving import fuse_projections, materialise_high_rank, prepare_for_serving
from scheduler.config import EngineConfig
from scheduler.engine import Engine
from scheduler.exit_policy import confidence, forced_exit_depth
from scheduler.sampling import SamplingParams

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def rrt64(tiny_hf: tuple[Path, LlamaForCausalLM]) -> RecursiveLM:
    """3 loops x 2 block layers, rank-4 deltas (low-rank in every module), float64 so that no
    confidence sits within rounding of a threshold."""
    model, _ = convert(
        load_model(tiny_hf[0]), 3, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
    )
    return model.to(torch.float64).eval()


@dataclass
class OracleOutput:
    tokens: list[int]
    exit_depths: list[int]
    logprobs: list[float]
    fills_read: int  # attention reads of a filled (not computed) K/V entry by later tokens


class ListAttention:
    """Attention of one token at depth ``depth`` over that depth's K/V lists (one entry per
    position, in order; a sliding window keeps the last ``window`` of them)."""

    def __init__(self, kv: list[list[list[tuple]]], depth: int, filled: list[list[set]]) -> None:
        self.kv, self.depth, self.filled = kv, depth, filled
        self.reads = 0

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0
    ) -> torch.Tensor:
        everything = self.kv[self.depth][layer]
        everything.append((k, v))
        first = max(0, len(everything) - window) if window else 0  # entry index = position
        entries = everything[first:]
        self.reads += sum(p >= first for p in self.filled[self.depth][layer])
        keys = torch.cat([e[0] for e in entries]).transpose(0, 1)[None]  # [1, Hkv, P, D]
        values = torch.cat([e[1] for e in entries]).transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, enable_gqa=True)
        return out[0].transpose(0, 1).flatten(1)


@torch.no_grad()
def oracle_decode(
    model: RecursiveLM,
    prompt: list[int],
    thresholds: tuple[float, ...],
    fill: str,
    forced: tuple[str, tuple[float, ...]] | None = None,
    heads: tuple[torch.Tensor, torch.Tensor] | None = None,
    gates: tuple[torch.Tensor, torch.Tensor] | None = None,
    preempt_at: tuple[int, ...] = (),
) -> OracleOutput:
    """``heads``: exit-head weights [B − 1, H, H] and biases [B − 1, H], applied here as
    h Wᵀ + bias before the LM head at every depth but the last (the model's own stay off).
    ``gates``: gate weights [B − 1, H] and biases [B − 1]: an early exit when
    sigmoid(w · h / rms(h) + c) >= threshold, in place of the max-prob rule.
    ``preempt_at``: output counts at which the request loses all its K/V (preemption) and
    recomputes prompt + outputs as one prefill, every position at every loop for real, the last
    one sampling the next token by the exit rule (and riding on)."""
    loops, layers = model.config.loops, model.config.block_layers
    out = OracleOutput([], [], [], 0)
    tokens = list(prompt)
    pending, prefill_len, pos = list(preempt_at), len(prompt), 0
    while pos < len(prompt) + MAX_TOKENS - 1:
        if pos == 0 or (pending and len(out.tokens) == pending[0] and pos == len(tokens) - 1):
            if pos:
                pending.pop(0)
                prefill_len, pos = len(tokens), 0
            kv: list[list[list[tuple]]] = [[[] for _ in range(layers)] for _ in range(loops)]
            filled: list[list[set]] = [[set() for _ in range(layers)] for _ in range(loops)]
        decode = pos >= prefill_len
        needs_logits = pos >= prefill_len - 1
        h = model.embed_tokens(torch.tensor([tokens[pos]]))
        positions = torch.tensor([pos])
        sampled = None
        for b in range(loops):
            attention = ListAttention(kv, b, filled)
            h = model.block_forward(h, b, positions, attention)
            out.fills_read += attention.reads
            if not needs_logits or sampled is not None:
                continue
            if gates is not None and b < loops - 1:
                x = h / h.pow(2).mean().add(1e-6).sqrt()
                if float(torch.sigmoid(x[0] @ gates[0][b] + gates[1][b])) < thresholds[b]:
                    continue
            exit_h = h if heads is None or b == loops - 1 else h @ heads[0][b].T + heads[1][b]
            logits = model.logits(exit_h).float()
            if forced is not None:  # (engine request id, weights): the forced schedule's depth
                if b < min(loops - 1, forced_exit_depth(forced[0], pos, forced[1])):
                    continue
            elif (  # the max-prob rule (with gates, the gate decided above)
                gates is None
                and b < loops - 1
                and float(confidence(logits, "prob")) < thresholds[b]
            ):
                continue
            sampled = int(logits.argmax())
            out.tokens.append(sampled)
            out.logprobs.append(float(logits.log_softmax(-1)[0, sampled]))
            out.exit_depths.append(b)
            if not decode or fill == "ride" or b == loops - 1:
                continue  # prefill (and ride) compute every loop for real
            for d in range(b + 1, loops):
                for layer in range(layers):
                    if fill == "copy":
                        kv[d][layer].append(kv[b][layer][-1])
                    else:
                        kv[d][layer].append(model.kv_projection(layer, h, d, positions))
                    filled[d][layer].add(pos)
            break
        if needs_logits:
            tokens.append(sampled)
        pos += 1
    assert not pending, f"preemptions at {pending} outputs never came"
    return out


def _prompts() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(3)
    return {
        f"r{i}": torch.randint(3, 101, (int(n),), generator=g).tolist()
        for i, n in enumerate([5, 17, 9, 30, 1, 12])
    }


def _thresholds(model: RecursiveLM) -> tuple[float, float]:
    """Thresholds near the median confidence at depths 0 and 1 (of a run with exits off, through
    the model's exit heads if it has them), so that tokens leave at every depth."""
    conf: list[list[float]] = [[], []]
    ids = torch.tensor([p[:9] for p in _prompts().values() if len(p) >= 9])
    for b, h in enumerate(model.loop_hidden_states(ids)[:2]):
        conf[b] = confidence(model.exit_logits(h, b).float(), "prob").flatten().tolist()
    return tuple(float(torch.tensor(c).median()) for c in conf)  # type: ignore[return-value]


MODES = [
    ("depth", "mixed", "propagate"),
    ("depth", "mixed", "copy"),
    ("depth", "aligned", "propagate"),
    ("depth", "aligned", "copy"),
    ("sequence", "auto", "ride"),
]


def _run_engine(
    model: RecursiveLM, prompts: dict[str, list[int]], fill: str, **config: object
) -> dict[str, tuple[list[int], list[int], list[float]]]:
    """Greedy tokens, exit depths and logprobs per request, from the engine under ``config``."""
    return _run_engine_recording(model, prompts, fill, 512, **config)[0]


def _run_engine_recording(
    model: RecursiveLM, prompts: dict[str, list[int]], fill: str, num_blocks: int, **config: object
) -> tuple[dict[str, tuple[list[int], list[int], list[float]]], dict[str, tuple[int, ...]]]:
    """``_run_engine`` with a K/V pool of ``num_blocks`` (too small for every request at once:
    the scheduler preempts running requests); also each request's output counts at its
    preemptions."""
    engine = Engine(
        model,
        EngineConfig(
            kv_fill="propagate" if fill == "ride" else fill,
            block_size=4,
            num_blocks=num_blocks,
            max_num_batched_tokens=48,
            max_model_len=128,
            **config,
        ),
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    got: dict[str, tuple[list[int], list[int], list[float]]] = {r: ([], [], []) for r in prompts}
    preempted: dict[str, list[int]] = {r: [] for r in prompts}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    waiting = {r.request_id for r in engine.scheduler.waiting}
    while engine.has_work:
        for o in engine.step()[0]:
            got[o.request_id][0].extend(o.token_ids)
            got[o.request_id][1].extend(o.exit_depths)
            got[o.request_id][2].extend(s.logprob for s in o.samples)
        now = {r.request_id for r in engine.scheduler.waiting}
        for rid in now - waiting:  # back in the queue: preempted during this step's schedule
            user_id = rid.removesuffix("#0")  # the engine's id of sample 0
            preempted[user_id].append(len(got[user_id][0]))
        waiting = now
    assert engine.scheduler.num_preemptions == sum(map(len, preempted.values()))
    assert engine.scheduler.allocator.num_used == 0
    return got, {r: tuple(n) for r, n in preempted.items()}


def _assert_engine_is_oracle(
    got: dict[str, tuple[list[int], list[int], list[float]]], want: dict[str, OracleOutput]
) -> None:
    """The engine's tokens and exit depths are the oracle's, and its logprobs too: they see
    every K/V the tokens attended to, filled ones included."""
    for rid, o in want.items():
        tokens, exit_depths, logprobs = got[rid]
        assert (tokens, exit_depths) == (o.tokens, o.exit_depths), rid
        torch.testing.assert_close(logprobs, o.logprobs, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def served64(rrt64: RecursiveLM) -> dict[str, RecursiveLM]:
    """The same model after the serving transforms — fused q|k|v and gate|up over low-rank
    deltas, or over dense per-depth weights; fills go through the fused k|v views. The oracle
    stays on the untransformed model."""
    lora, dense = copy.deepcopy(rrt64), copy.deepcopy(rrt64)
    plan = prepare_for_serving(lora)
    assert (plan.dense, plan.fused) == ([], [("q", "k", "v"), ("gate", "up")])
    materialise_high_rank(dense, force=True)
    assert fuse_projections(dense) == [("q", "k", "v"), ("gate", "up")]
    return {"plain": rrt64, "fused-lora": lora, "fused-dense": dense}


@pytest.mark.parametrize("served", ["plain", "fused-lora", "fused-dense"])
@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_engine_equals_per_token_oracle_with_mixed_exits(
    served64: dict[str, RecursiveLM], batching: str, alignment: str, fill: str, served: str
) -> None:
    rrt64 = served64["plain"]
    thresholds = _thresholds(rrt64)
    prompts = _prompts()
    want = {rid: oracle_decode(rrt64, ids, thresholds, fill) for rid, ids in prompts.items()}
    depths = {d for o in want.values() for d in o.exit_depths}
    assert depths == {0, 1, 2}, f"the schedule must exit at every depth, got {depths}"
    if fill != "ride":
        assert sum(o.fills_read for o in want.values()) > 0, "no later token read a fill"
    got = _run_engine(
        served64[served],
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        exit_thresholds=thresholds,
    )
    _assert_engine_is_oracle(got, want)


@pytest.mark.parametrize("served", ["plain", "fused-lora"])
@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_preempted_requests_that_exited_early_equal_the_recomputing_oracle(
    served64: dict[str, RecursiveLM], batching: str, alignment: str, fill: str, served: str
) -> None:
    """Requests preempted after early exits — their first sample, taken during prefill, among
    them — recompute from scratch: the oracle drops their K/V at the same output counts and
    re-prefills prompt + outputs at every loop, so the tokens after a preemption attend to real
    K/V where, unpreempted, they would read fills. Exits follow the forced schedule (every
    depth equally likely), so that later tokens run deep enough to read them."""
    rrt64, weights = served64["plain"], (1.0, 1.0, 1.0)
    prompts = _prompts()
    got, preempted = _run_engine_recording(
        served64[served],
        prompts,
        fill,
        64,
        batching=batching,
        depth_alignment=alignment,
        forced_exit_weights=weights,
    )
    early_prefill_then_preempted = [
        r for r, n in preempted.items() if n and n[0] > 0 and got[r][1][0] < 2
    ]
    assert early_prefill_then_preempted, f"no early-exited prefill was preempted: {preempted}"

    def oracle(rid: str, preempt_at: tuple[int, ...]) -> OracleOutput:
        forced = (f"{rid}#0", weights)
        return oracle_decode(rrt64, prompts[rid], (), fill, forced, preempt_at=preempt_at)

    want = {rid: oracle(rid, preempted[rid]) for rid in prompts}
    _assert_engine_is_oracle(got, want)
    if fill != "ride":  # the recompute changed what later tokens read: a real test of it
        unpreempted = {rid: oracle(rid, ()) for rid in early_prefill_then_preempted}
        assert any(o.logprobs != want[rid].logprobs for rid, o in unpreempted.items()), (
            "the preemptions changed nothing: no later token read a dropped fill"
        )


def _with_heads(model: RecursiveLM, seed: int) -> tuple[RecursiveLM, dict[str, torch.Tensor]]:
    """A copy with random (non-identity) exit heads and gates, and their weights."""
    h = model.config.arch.hidden_size
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(h, dtype=torch.float64)
    weights = {
        "weight": eye + 0.5 * torch.randn(2, h, h, generator=gen, dtype=torch.float64) / h**0.5,
        "bias": 0.3 * torch.randn(2, h, generator=gen, dtype=torch.float64),
        "gate_weight": torch.randn(2, h, generator=gen, dtype=torch.float64) / h**0.5,
        "gate_bias": torch.zeros(2, dtype=torch.float64),
    }
    out = copy.deepcopy(model)
    out.exit_heads = ExitHeads(2, h, dtype=torch.float64)
    out.exit_heads.load_state_dict(weights)
    out.config = replace(out.config, exit_heads=True)
    return out, weights


@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_engine_with_exit_heads_equals_the_oracle_applying_them(
    rrt64: RecursiveLM, batching: str, alignment: str, fill: str
) -> None:
    """Learned exit heads change each early exit's confidence and token: the engine's must be
    the oracle's that applies the same head weights itself, and differ from the head-less
    oracle's (so the heads are not ignored)."""
    model, w = _with_heads(rrt64, seed=5)
    weight, bias = w["weight"], w["bias"]
    prepare_for_serving(model)
    thresholds = _thresholds(model)
    prompts = _prompts()
    want = {
        rid: oracle_decode(rrt64, ids, thresholds, fill, heads=(weight, bias))
        for rid, ids in prompts.items()
    }
    assert {d for o in want.values() for d in o.exit_depths} == {0, 1, 2}
    blind = {rid: oracle_decode(rrt64, ids, thresholds, fill) for rid, ids in prompts.items()}
    assert any(blind[r].tokens != o.tokens for r, o in want.items())
    got = _run_engine(
        model,
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        exit_thresholds=thresholds,
    )
    _assert_engine_is_oracle(got, want)


@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES)
def test_gated_exits_equal_the_oracle_and_run_the_lm_head_only_for_exits(
    rrt64: RecursiveLM, batching: str, alignment: str, fill: str
) -> None:
    """The cheap exit decision: the gate's score on the hidden state decides, the LM head
    runs for exactly one row per emitted token (none for rows that go on), and the tokens are
    the oracle's that applies the same gate and heads from their raw weights."""
    model, w = _with_heads(rrt64, seed=6)
    prepare_for_serving(model)
    ids = torch.tensor([p[:9] for p in _prompts().values() if len(p) >= 9])
    with torch.no_grad():
        states = model.loop_hidden_states(ids)[:2]
        thresholds = tuple(
            float(model.exit_heads.gate(x, b).median()) for b, x in enumerate(states)
        )
    prompts = _prompts()
    gates = (w["gate_weight"], w["gate_bias"])
    want = {
        rid: oracle_decode(rrt64, p, thresholds, fill, heads=(w["weight"], w["bias"]), gates=gates)
        for rid, p in prompts.items()
    }
    assert {d for o in want.values() for d in o.exit_depths} == {0, 1, 2}
    head_rows = []
    plain_logits = model.logits
    model.logits = lambda h: head_rows.append(h.shape[0]) or plain_logits(h)  # type: ignore[method-assign]
    got = _run_engine(
        model,
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        exit_thresholds=thresholds,
        exit_measure="gate",
    )
    _assert_engine_is_oracle(got, want)
    assert sum(head_rows) == sum(len(o.tokens) for o in want.values())


def test_fill_policies_give_different_logprobs(rrt64: RecursiveLM) -> None:
    """The schedule tells the policies apart: a fill that wrote nothing, or the other
    policy's K/V, could not match the oracle of the policy under test."""
    thresholds = _thresholds(rrt64)
    outs = {
        fill: [oracle_decode(rrt64, ids, thresholds, fill).logprobs for ids in _prompts().values()]
        for fill in ("propagate", "copy", "ride")
    }
    for a, b in (("propagate", "copy"), ("propagate", "ride"), ("copy", "ride")):
        gap = max(
            abs(x - y)
            for p, q in zip(outs[a], outs[b], strict=True)
            for x, y in zip(p, q, strict=True)
        )
        assert gap > 1e-3, f"{a} vs {b}: logprobs differ by at most {gap}"


@pytest.mark.parametrize(("batching", "alignment", "fill"), MODES[:2] + MODES[4:])
def test_forced_exit_schedule_equals_the_oracle(
    served64: dict[str, RecursiveLM], batching: str, alignment: str, fill: str
) -> None:
    """The benchmark's forced schedule: every token leaves at the depth drawn from (request,
    position), the engine's tokens and fills as the oracle's under the same schedule."""
    model, weights = served64["fused-lora"], (1.0, 1.0, 1.0)
    prompts = _prompts()
    want = {
        rid: oracle_decode(served64["plain"], ids, (), fill, (f"{rid}#0", weights))
        for rid, ids in prompts.items()
    }
    assert {d for o in want.values() for d in o.exit_depths} == {0, 1, 2}
    got = _run_engine(
        model,
        prompts,
        fill,
        batching=batching,
        depth_alignment=alignment,
        forced_exit_weights=weights,
    )
    for rid, o in want.items():
        assert got[rid][:2] == (o.tokens, o.exit_depths), rid


_TRITON_RUN = """
import json, sys
import torch
from loopserve_kernels import use_backend
from model.checkpoint import load_model
from model.config import LINEAR_MODULES
from model.convert import convert
from model.serving import prepare_for_serving
from tests.test_exit_oracle import _prompts, _run_engine

model, _ = convert(
    load_model(sys.argv[1]), 3, "average", dict.fromkeys(LINEAR_MODULES, 4), progress=False
)
prepare_for_serving(model.float().eval())
prompts = dict(list(_prompts().items())[:2])
run = dict(forced_exit_weights=(1.0, 1.0, 1.0), batching="depth", depth_alignment="mixed")
out = {}
for backend in ("torch", "triton"):
    with use_backend(backend):
        out[backend] = _run_engine(model, prompts, "propagate", **run)
print(json.dumps(out))
"""


def test_triton_path_engine_run_equals_the_torch_path(
    tiny_hf: tuple[Path, LlamaForCausalLM],
) -> None:
    """One engine run with every kernel on the Triton path (the interpreter on a CPU: fused
    LoRA matmuls, K/V writes, paged attention over mixed depths) under the forced schedule,
    against the same run on the torch twins: the same tokens and exit depths, logprobs within
    float32 rounding. In a fresh interpreter with ``TRITON_INTERPRET=1`` from the start, so
    the interpreter's copy of triton never meets this process's."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_RUN, str(tiny_hf[0])],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    want, got = out["torch"], out["triton"]
    for rid, (tokens, depths, logprobs) in want.items():
        assert got[rid][:2] == [tokens, depths], rid
        assert got[rid][2] == pytest.approx(logprobs, abs=1e-4), rid
    assert {d for _, depths, _ in want.values() for d in depths} == {0, 1, 2}
