"""Uptraining: knowledge distillation from the original model into its recursive conversion.

Below full rank a conversion is destroyed until trained (DESIGN.md §6). The loss is the
paper's: forward KL(teacher ‖ student) on the final loop, plus an early-exit term that trains
every intermediate loop's exit head (final norm + LM head on that loop's hidden state) by CE on
the next token and by KD against the *detached* final-loop distribution — so the intermediate
loops learn to predict what the full depth will say, without pulling the final loop back.

The trainer is resumable bit-for-bit: model, optimizer, step (the LR schedule is a pure
function of it), data position and RNG are saved together, atomically.

Under torchrun it trains data-parallel (``training.distributed``: DDP by default, FSDP2 as an
option). ``batch_size`` is the *global* micro-batch: every rank takes its slice of the same
seeded global batch, so N processes follow the single-process run's loss curve and weights up
to floating-point summation order, and a checkpoint written at one world size continues at
another. Rank 0 writes the log and the state; every rank evaluates (the same numbers).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loopserve_kernels.dispatch import use_backend
from model.recursive import RecursiveLM
from training import distributed
from training.loss import LossWeights, chunked_distill_loss, distill_loss, part_names

PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "shared": ("weights.", "biases."),
    "lora": ("lora_a.", "lora_b."),
    "norms": ("input_norm", "post_attn_norm", "final_norm", "norms."),  # norms.: families
    "embeddings": ("embed", "lm_head"),
}
DEFAULT_GROUPS: tuple[str, ...] = ("shared", "lora", "norms")
# Fields that change the training math: a resume with different values would not continue
# the same run, so it is refused.
_RESUME_FIELDS: tuple[str, ...] = (
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "temperature",
    "kd_weight",
    "ce_weight",
    "exit_kd_weight",
    "exit_ce_weight",
    "exit_warmup_steps",
    "train_groups",
    "seed",
)
# A held-out measurement of the student beyond ``evaluate``'s, run at every evaluation and
# logged under its name (e.g. a conversion's fidelity report on its own evaluation sets).
Probe = Callable[[RecursiveLM], dict[str, Any]]


class UptrainError(ValueError):
    """A training configuration or state that cannot be used; the message says why."""


@dataclass(frozen=True)
class UptrainConfig:
    """Hyper-parameters of one uptraining run.

    ``steps`` counts optimizer steps of ``batch_size * grad_accum`` windows. The LR warms up
    linearly for ``warmup_steps`` then follows a cosine down to ``lr * min_lr_ratio``.
    ``exit_*_weight`` weight each intermediate loop's CE / KD term (the paper uses ~0.1);
    they ramp up linearly from 0 over the first ``exit_warmup_steps`` steps, so a good start
    is not wrecked by the intermediate loops' large initial KL (DESIGN.md §7).
    ``loss_chunk`` tokens at a time go through the exit head (``training.loss``; 0: the
    reference loss that builds every loop's full logits). ``batch_size`` is global: split
    across the ranks of a torchrun job, which use ``strategy`` (``ddp`` or ``fsdp``).
    """

    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    exit_kd_weight: float = 0.1
    exit_ce_weight: float = 0.1
    exit_warmup_steps: int = 0
    loss_chunk: int = 256
    strategy: str = "ddp"
    train_groups: tuple[str, ...] = DEFAULT_GROUPS
    eval_every: int = 100
    eval_batch_size: int = 4
    checkpoint_every: int = 200
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise UptrainError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("checkpoint_every", "warmup_steps", "exit_warmup_steps", "loss_chunk"):
            if getattr(self, name) < 0:
                raise UptrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.strategy not in distributed.STRATEGIES:
            raise UptrainError(
                f"strategy must be one of {list(distributed.STRATEGIES)}, got {self.strategy!r}"
            )
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UptrainError(
                f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}"
            )
        if self.temperature <= 0:
            raise UptrainError(f"temperature must be > 0, got {self.temperature}")
        weights = (self.kd_weight, self.ce_weight, self.exit_kd_weight, self.exit_ce_weight)
        if min(weights) < 0 or self.kd_weight + self.ce_weight == 0:
            raise UptrainError(
                f"loss weights must be >= 0 with kd_weight + ce_weight > 0, got {weights}"
            )
        unknown = set(self.train_groups) - set(PARAM_GROUPS)
        if unknown or not self.train_groups:
            raise UptrainError(
                f"train_groups must be a non-empty subset of {list(PARAM_GROUPS)}, "
                f"got {list(self.train_groups)}"
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise UptrainError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise UptrainError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UptrainError(f"device {self.device!r} requested but CUDA is not available")
        return self.device

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def loss_weights(self, step: int) -> LossWeights:
        """The loss weights at optimizer step ``step`` (0-based): the exit weights are
        ``step / exit_warmup_steps`` of their value until the warm-up ends (0 at step 0)."""
        ramp = 1.0
        if self.exit_warmup_steps:
            ramp = min(1.0, step / self.exit_warmup_steps)
        return LossWeights(
            kd=self.kd_weight,
            ce=self.ce_weight,
            exit_kd=self.exit_kd_weight * ramp,
            exit_ce=self.exit_ce_weight * ramp,
            temperature=self.temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_group_of(name: str) -> str:
    """The trainable group a RecursiveLM parameter belongs to. A middle-cycle model's unique
    layers (``prefix.`` / ``suffix.``) fall in the block's groups: their dense weights train
    with ``shared``, their norms with ``norms``."""
    bare = name.removeprefix("prefix.").removeprefix("suffix.")
    for group, prefixes in PARAM_GROUPS.items():
        if any(bare == p or bare.startswith(p) for p in prefixes):
            return group
    raise UptrainError(f"parameter {name!r} belongs to no trainable group")


def mark_trainable(model: RecursiveLM, groups: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` by group; return the trainable parameters in a fixed order."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(param_group_of(name) in groups)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise UptrainError(f"groups {list(groups)} select no parameters of this model")
    return params


def student_loss(
    student: RecursiveLM,
    teacher: RecursiveLM,
    teacher_hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: LossWeights,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The uptraining loss on windows ``ids`` [N, S] and its parts (``part_names`` order).

    ``teacher_hidden`` [N, S, H]: the teacher's final hidden state (no gradient); its logits
    are built ``chunk`` tokens at a time with the student's (``chunk`` 0: all at once).
    """
    states = student.loop_hidden_states(ids)
    if chunk == 0:
        with torch.no_grad():
            teacher_logits = teacher.logits(teacher_hidden)
        return distill_loss(states, student.logits, teacher_logits, ids, weights)
    flat = teacher_hidden.flatten(0, 1)  # [N·S, H]

    @torch.no_grad()
    def teacher_chunk(rows: slice) -> torch.Tensor:
        return teacher.logits(flat[rows])

    params = list(student.parameters())
    return chunked_distill_loss(states, student.logits, params, teacher_chunk, ids, weights, chunk)


class StudentLoss(torch.nn.Module):
    """The student with its loss as ``forward``: what DDP / FSDP2 wrap (both hook ``forward``).

    The teacher is held outside the module tree, so it is neither wrapped, sharded nor
    trained; every rank keeps a full copy for its own slice of the batch.
    """

    def __init__(self, student: RecursiveLM, teacher: RecursiveLM) -> None:
        super().__init__()
        self.student = student
        self._teacher = (teacher,)

    def forward(
        self, ids: torch.Tensor, teacher_hidden: torch.Tensor, weights: LossWeights, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return student_loss(self.student, self._teacher[0], teacher_hidden, ids, weights, chunk)


@dataclass
class EvalResult:
    """Held-out quality of the student against the teacher.

    ``kl``/``agreement``/``ppl`` are for the final loop; ``loop_*`` lists have one entry per
    loop (the last equals the final-loop figures): agreement of that loop's argmax with the
    final loop's (what an early exit would change) and with the teacher's.
    """

    tokens: int
    kl: float
    agreement: float
    ppl: float
    teacher_ppl: float
    loop_kl: list[float] = field(default_factory=list)
    loop_agree_final: list[float] = field(default_factory=list)
    loop_agree_teacher: list[float] = field(default_factory=list)

    def summary(self) -> str:
        loops = " ".join(f"{100 * a:.1f}%" for a in self.loop_agree_final[:-1])
        return (
            f"KL {self.kl:.4f} | top-1 agreement {100 * self.agreement:.1f}% | ppl "
            f"{self.ppl:.4g} (teacher {self.teacher_ppl:.4g}) | loop->final agreement {loops}"
        )


@torch.no_grad()
def evaluate(
    student: RecursiveLM,
    teacher: RecursiveLM,
    windows: torch.Tensor,
    batch_size: int = 4,
    autocast: bool = False,
) -> EvalResult:
    """Compare student loops with the teacher on held-out windows [N, S] (float64 metrics)."""
    loops = student.config.loops
    kl = [0.0] * loops
    agree_final = [0.0] * loops
    agree_teacher = [0.0] * loops
    nll = nll_teacher = 0.0
    tokens = predicted = 0
    device = student.device
    for ids in windows.split(batch_size):
        ids = ids.to(device)
        with _autocast(device, autocast):
            t_logits = teacher(ids)
            states = student.loop_hidden_states(ids)
            logits = [student.logits(h) for h in states]
        t_logp = t_logits.double().log_softmax(-1)
        t_top = t_logp.argmax(-1)
        final_top = logits[-1].argmax(-1)
        labels = ids[:, 1:].reshape(-1)
        for b, lg in enumerate(logits):
            logp = lg.double().log_softmax(-1)
            kl[b] += float((t_logp.exp() * (t_logp - logp)).sum())
            top = logp.argmax(-1)
            agree_final[b] += float((top == final_top).sum())
            agree_teacher[b] += float((top == t_top).sum())
        final_logp = logits[-1].double().log_softmax(-1)
        nll += float(F.nll_loss(final_logp[:, :-1].flatten(0, 1), labels, reduction="sum"))
        nll_teacher += float(F.nll_loss(t_logp[:, :-1].flatten(0, 1), labels, reduction="sum"))
        tokens += ids.numel()
        predicted += labels.numel()
    return EvalResult(
        tokens=tokens,
        kl=kl[-1] / tokens,
        agreement=agree_teacher[-1] / tokens,
        ppl=math.exp(min(nll / predicted, 700.0)),
        teacher_ppl=math.exp(min(nll_teacher / predicted, 700.0)),
        loop_kl=[v / tokens for v in kl],
        loop_agree_final=[v / tokens for v in agree_final],
        loop_agree_teacher=[v / tokens for v in agree_teacher],
    )


# The fields of an evaluation log record that probes may not reuse.
_LOG_FIELDS = {"step", "tokens_seen", "train_seconds", "lr", "train_loss"} | set(
    EvalResult.__dataclass_fields__
)


def _autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; fp32 (a no-op context) otherwise."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def training_kernels() -> Iterator[None]:
    """Kernels that autograd can differentiate, and differentiates correctly.

    The Triton kernels are inference-only: ``use_backend`` selects the torch twins for the run
    (in this thread only). On CUDA, cuDNN's SDPA backward is left out (flash, memory-efficient
    and math remain): on H100/H200 with torch >= 2.11 it has returned NaN query gradients
    (pytorch/pytorch#196678, huggingface/trl#7181).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with use_backend("torch"), sdpa_kernel(backends):
        yield


@dataclass
class StepStats:
    step: int
    lr: float
    tokens: int
    grad_norm: float
    parts: dict[str, float]


@dataclass
class RunSummary:
    """How a ``run`` ended: steps done, tokens seen (all ranks), throughput, whether it
    stopped before ``config.steps`` (time bound or ``stop_step``), the last evaluation, and
    the job's shape with each rank's peak memory in bytes."""

    step: int
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    stopped_early: bool
    final_eval: EvalResult | None
    world_size: int = 1
    strategy: str = "single"
    peak_memory_bytes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Uptrainer:
    """Distils ``teacher`` into ``student`` over packed windows; one object per run (per rank).

    ``train_windows`` [N, S] are visited in a fresh seeded permutation each epoch; the data
    position (epoch, cursor) is part of the saved state. In a process group every rank holds
    the same windows and takes its contiguous slice of each global micro-batch. ``probes``
    run beside ``evaluate`` at every evaluation; their results go into the log record.
    """

    def __init__(
        self,
        student: RecursiveLM,
        teacher: RecursiveLM,
        train_windows: torch.Tensor,
        eval_windows: torch.Tensor,
        config: UptrainConfig,
        log_path: str | Path | None = None,
        probes: Mapping[str, Probe] | None = None,
    ) -> None:
        if student.config.arch.vocab_size != teacher.config.arch.vocab_size:
            raise UptrainError(
                f"student vocabulary {student.config.arch.vocab_size} differs from the "
                f"teacher's {teacher.config.arch.vocab_size}"
            )
        if train_windows.ndim != 2 or train_windows.shape[0] < config.batch_size:
            raise UptrainError(
                f"need at least batch_size={config.batch_size} training windows [N, S], "
                f"got shape {tuple(train_windows.shape)}"
            )
        if eval_windows.ndim != 2 or eval_windows.shape[0] == 0:
            raise UptrainError(f"need held-out windows [N, S], got {tuple(eval_windows.shape)}")
        self.probes = dict(probes or {})
        taken = set(self.probes) & _LOG_FIELDS
        if taken:
            raise UptrainError(f"probe names {sorted(taken)} clash with the log's own fields")
        self.ranks = distributed.current_ranks()
        if config.batch_size % self.ranks.world_size:
            raise UptrainError(
                f"batch_size {config.batch_size} (global) must be a multiple of the "
                f"{self.ranks.world_size} processes"
            )
        self.config = config
        self.device = config.resolved_device()
        if self.device.startswith("cuda") and self.ranks.distributed:
            self.device = f"cuda:{self.ranks.local_rank}"
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device)
        self.teacher.requires_grad_(False)
        self.train_windows = train_windows
        self.eval_windows = eval_windows
        self.log_path = Path(log_path) if log_path else None
        mark_trainable(self.student, config.train_groups)
        # The names in optimizer order: the checkpoint's optimizer state is keyed by position
        # in this list whatever the strategy, so DDP, FSDP2 and one process share one format.
        self.trainable_names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        self.model = distributed.wrap_module(
            StudentLoss(self.student, self.teacher), config.strategy, self.device
        )
        self.sharded = self.ranks.distributed and config.strategy == "fsdp"
        # After wrapping: FSDP2 replaces the parameters by sharded DTensors.
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr_at(0),
            betas=config.betas,
            weight_decay=config.weight_decay,
            fused=self.device.startswith("cuda"),
        )
        self.step = 0
        self.tokens_seen = 0
        self.epoch = 0
        self.cursor = 0
        self.train_seconds = 0.0
        self._order = self._permutation(0)
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    @property
    def autocast(self) -> bool:
        return self.device.startswith("cuda")

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(self.train_windows.shape[0], generator=gen)

    def _next_batch(self) -> torch.Tensor:
        """This rank's slice of the next global micro-batch [batch_size / world, S]."""
        n = self.config.batch_size
        if self.cursor + n > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor : self.cursor + n]
        self.cursor += n
        local = n // self.ranks.world_size
        idx = idx[self.ranks.rank * local : (self.ranks.rank + 1) * local]
        return self.train_windows[idx].to(self.device)

    def train_step(self) -> StepStats:
        """One optimizer step over ``grad_accum`` global micro-batches."""
        cfg = self.config
        lr = cfg.lr_at(self.step)
        weights = cfg.loss_weights(self.step)
        names = part_names(self.student.config.loops, weights)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        totals = torch.zeros(len(names), dtype=torch.float64)
        tokens = 0
        for micro in range(cfg.grad_accum):
            ids = self._next_batch()
            last = micro == cfg.grad_accum - 1
            with (
                distributed.no_gradient_sync(self.model, skip=not last),
                _autocast(self.device, self.autocast),
            ):
                with torch.no_grad():
                    teacher_hidden = self.teacher.loop_hidden_states(ids)[-1]
                loss, parts = self.model(ids, teacher_hidden, weights, cfg.loss_chunk)
                (loss / cfg.grad_accum).backward()
            totals += parts.detach().double().cpu() / cfg.grad_accum
            tokens += ids.numel() * self.ranks.world_size
        # One collective and one device-to-host copy for all logged parts.
        mean = distributed.mean_across_ranks(totals.to(self.device)).cpu().tolist()
        parts_dict = dict(zip(names, mean, strict=True))
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of the global norm
            norm = norm.full_tensor()
        if not math.isfinite(float(norm)):
            # Stepping would turn every weight into NaN; stop with the evidence instead.
            raise UptrainError(
                f"non-finite gradient norm at step {self.step + 1} (loss parts {parts_dict}); "
                "the last saved state is intact"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        return StepStats(self.step, lr, tokens, float(norm), parts_dict)

    @contextlib.contextmanager
    def _whole_student(self) -> Iterator[RecursiveLM]:
        """The student in eval mode with its full parameters (FSDP2 gathers them meanwhile)."""
        self.student.eval()
        if self.sharded:
            self.model.unshard()
        try:
            yield self.student
        finally:
            if self.sharded:
                self.model.reshard()

    def evaluate(self) -> EvalResult:
        """Held-out evaluation (every rank computes the same numbers)."""
        with self._whole_student() as student:
            return evaluate(
                student,
                self.teacher,
                self.eval_windows,
                self.config.eval_batch_size,
                self.autocast,
            )

    @torch.no_grad()
    def probe(self) -> dict[str, Any]:
        """Every probe's measurement of the student, by name (no gradients)."""
        with self._whole_student() as student:
            return {name: fn(student) for name, fn in self.probes.items()}

    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full (unsharded) CPU state dicts of the student and of AdamW, optimizer state keyed
        by position in ``trainable_names``. Collective under FSDP2: every rank calls it."""
        if not self.sharded:
            model = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
            return model, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optim = get_state_dict(self.model, self.optimizer, options=options)
        model = {k.removeprefix("student."): v for k, v in model.items()}
        index = {f"student.{n}": i for i, n in enumerate(self.trainable_names)}
        optim = {
            "state": {index[k]: v for k, v in optim.get("state", {}).items()},
            "param_groups": [
                {**g, "params": [index[k] for k in g["params"]]}
                for g in optim.get("param_groups", [])
            ],
        }
        return model, optim

    def full_student_state(self) -> dict[str, torch.Tensor]:
        """The student's full CPU state dict (collective under FSDP2: every rank calls it)."""
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        return {k.removeprefix("student."): v for k, v in state.items()}

    def _load_model_and_optimizer(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        if not self.sharded:
            self.student.load_state_dict(model)
            self.optimizer.load_state_dict(optim)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        names = [f"student.{n}" for n in self.trainable_names]
        fqn_optim = {
            "state": {names[i]: v for i, v in optim["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]
            ],
        }
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict={f"student.{k}": v for k, v in model.items()},
            optim_state_dict=fqn_optim,
            options=StateDictOptions(full_state_dict=True),
        )

    def state_dict(self) -> dict[str, Any]:
        """The resumable state (collective in a process group: every rank calls it; the RNG
        state of every rank is kept)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        model, optim = self._model_and_optimizer_state()
        return {
            "config": self.config.to_dict(),
            "model": model,
            "optimizer": optim,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "train_seconds": self.train_seconds,
            "world_size": self.ranks.world_size,
            "rng": distributed.gather_objects(rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["config"]
        diff = {
            f: (saved.get(f), getattr(self.config, f))
            for f in _RESUME_FIELDS
            if _normalise(saved.get(f)) != _normalise(getattr(self.config, f))
        }
        if diff:
            raise UptrainError(
                "cannot resume: the training settings differ from the saved run "
                + ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in diff.items())
            )
        self._load_model_and_optimizer(state["model"], state["optimizer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.train_seconds = state["train_seconds"]
        self._order = self._permutation(self.epoch)
        # One RNG state per saved rank; at another world size every rank takes rank 0's.
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        rng = rngs[self.ranks.rank] if len(rngs) == self.ranks.world_size else rngs[0]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_state(self, path: str | Path) -> None:
        """Write the resumable state atomically (a kill mid-write keeps the previous one).

        Every rank must call it (gathering is collective); rank 0 writes the file.
        """
        state = self.state_dict()
        if not self.ranks.is_main:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_state(self, path: str | Path) -> None:
        """Resume from ``path``; every rank reads it (on a shared or copied filesystem)."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=False)
        except (OSError, RuntimeError) as e:
            raise UptrainError(f"cannot read training state {path}: {e}") from e
        self.load_state_dict(state)

    def _log(self, record: dict[str, Any]) -> None:
        if self.log_path is None or not self.ranks.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _eval_and_log(self, train_loss: float | None, lr: float) -> EvalResult:
        result = self.evaluate()
        self._log(
            {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "train_seconds": round(self.train_seconds, 3),
                "lr": lr,
                "train_loss": train_loss,
                **asdict(result),
                **self.probe(),
            }
        )
        return result

    def run(self, state_path: str | Path | None = None, stop_step: int | None = None) -> RunSummary:
        """Train to ``config.steps`` (or until ``max_minutes``), evaluating and checkpointing.

        With ``state_path`` the state is saved every ``checkpoint_every`` steps and at the end;
        load it first with ``load_state`` to resume. ``stop_step`` ends the run at that step
        with the schedule still spanning ``config.steps``: a run that matches another one
        cut short by its time bound.
        """
        cfg = self.config
        last = cfg.steps if stop_step is None else min(cfg.steps, stop_step)
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        with training_kernels():
            result = self._eval_and_log(None, 0.0) if self.step == 0 else None
            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                desc="uptrain",
                disable=not (cfg.progress and self.ranks.is_main),
            )
            losses: list[float] = []
            stats = None
            while self.step < last:
                start = time.perf_counter()
                stats = self.train_step()
                if self.autocast:
                    torch.cuda.synchronize()
                self.train_seconds += time.perf_counter() - start
                losses.append(stats.parts["loss"])
                bar.update()
                bar.set_postfix(
                    loss=f"{stats.parts['loss']:.4f}",
                    tok_s=f"{self.tokens_seen / max(self.train_seconds, 1e-9):.0f}",
                )
                if self.step % cfg.eval_every == 0:
                    result = self._eval_and_log(sum(losses) / len(losses), stats.lr)
                    losses = []
                    if self.ranks.is_main:
                        bar.write(f"step {self.step}: {result.summary()}")
                if state_path and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_state(state_path)
                # Every rank stops at the same step (clocks differ).
                if deadline < math.inf and distributed.any_rank(
                    time.monotonic() >= deadline, self.device
                ):
                    break
            bar.close()
            stopped_early = self.step < cfg.steps
            if losses and stats is not None:
                result = self._eval_and_log(sum(losses) / len(losses), stats.lr)
            if state_path:
                self.save_state(state_path)
        return RunSummary(
            step=self.step,
            tokens_seen=self.tokens_seen,
            train_seconds=self.train_seconds,
            tokens_per_second=self.tokens_seen / max(self.train_seconds, 1e-9),
            stopped_early=stopped_early,
            final_eval=result,
            world_size=self.ranks.world_size,
            strategy=self.config.strategy if self.ranks.distributed else "single",
            peak_memory_bytes=distributed.gather_objects(peak_memory_bytes(self.device)),
        )


def peak_memory_bytes(device: str) -> int:
    """This process's peak memory: CUDA's allocator peak on a GPU, else the peak resident set
    (which includes the loaded models and the Python runtime)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal after a JSON or pickle round trip."""
    return list(value) if isinstance(value, tuple | list) else value
