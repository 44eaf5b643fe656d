"""Multi-process training with PyTorch's own stack: torchrun's environment, DDP or FSDP2.

``loopserve uptrain`` runs unchanged under ``torchrun --nproc-per-node N [--nnodes M ...]``:
torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``init_distributed`` joins the
process group (NCCL on CUDA, gloo on the CPU) and picks this rank's device. Without torchrun
(``WORLD_SIZE`` unset or 1) nothing is initialised and training is single-process.

Everything here is a thin adapter: the trainer asks for the rank and world size, wraps its loss
module with ``wrap_module`` and reduces logged numbers with ``mean_across_ranks``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, world size and rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def current_ranks() -> Ranks:
    """The running process group's ranks, else torchrun's environment, else one process."""
    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), local)


def init_distributed(device: str) -> tuple[Ranks, str]:
    """Join torchrun's process group when there is one; return the ranks and this rank's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    ranks = current_ranks()
    if device.startswith("cuda") and ranks.distributed:
        device = f"cuda:{ranks.local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if ranks.distributed and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        ranks = current_ranks()
    return ranks, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small tensor over all ranks (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_module(module: nn.Module, strategy: str, device: str) -> nn.Module:
    """Wrap the loss module for data parallelism: DDP (replicated parameters, all-reduced
    gradients) or FSDP2 (``fully_shard``: parameters, gradients and optimizer state sharded on
    dim 0 across ranks, gathered for each forward and backward).

    ``module`` itself is returned without a process group. Call it before building the
    optimizer: FSDP2 replaces the parameters by sharded DTensors.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # Buffers (RoPE frequencies) are the same on every rank: no broadcast each forward (the
    # argument's name changed in torch 2.13).
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {
        "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False
    }
    return DistributedDataParallel(module, device_ids=ids, **no_sync)


@contextlib.contextmanager
def no_gradient_sync(wrapped: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for a micro-batch that is not the step's last one.

    FSDP2 reduce-scatters every micro-batch anyway (its point is not to hold unsharded
    gradients), and a single process has nothing to sync.
    """
    no_sync = getattr(wrapped, "no_sync", None)
    if skip and no_sync is not None:
        with no_sync():
            yield
    else:
        yield
