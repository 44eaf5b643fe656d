"""The runner's persistent row state: a slot per live request, all their block tables in one
int32 device tensor, and their exit settings as device rows.

The scheduler sends only what changed each step (``SchedulerOutput.new_requests``,
``new_blocks``, ``dropped``), so a step's host work grows with what is new, not with every
request's block tables and settings; slot mappings and attention metadata are then gathered
on the device from the tables. vLLM v1's ``InputBatch`` does the same for its block tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loopserve_kernels import PagedAttentionMetadata
from scheduler.scheduler import NewBlocks, NewRequest


class RowBatch:
    """Per-request state the runner keeps across steps, keyed by request id.

    ``tables[s, d, j]`` is the j-th KV block of the request in slot s at loop depth d;
    ``thresholds[s, d]`` its exit threshold after loop d, ``min_loops[s]`` its floor.
    """

    def __init__(
        self,
        max_seqs: int,
        loops: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.device = device
        width = math.ceil(max_model_len / block_size)
        self.tables = torch.zeros(max_seqs, loops, width, dtype=torch.int32, device=device)
        self.thresholds = torch.zeros(max_seqs, loops, dtype=torch.float32, device=device)
        self.min_loops = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self.requests: dict[str, NewRequest] = {}
        self.slot: dict[str, int] = {}
        self._free = list(range(max_seqs - 1, -1, -1))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.slot

    def update(
        self, dropped: Sequence[str], new: Sequence[NewRequest], blocks: Sequence[NewBlocks]
    ) -> None:
        """Apply one step's changes: forget ``dropped``, admit ``new``, append ``blocks``
        (one host-to-device copy for all the new block ids)."""
        for rid in dropped:
            self.remove(rid)
        for req in new:
            if req.request_id in self.slot:
                raise ValueError(f"request {req.request_id!r} already holds a row slot")
            if not self._free:
                raise RuntimeError("more live requests than the row batch's max_num_seqs slots")
            s = self._free.pop()
            self.slot[req.request_id] = s
            self.requests[req.request_id] = req
            self.thresholds[s] = torch.tensor(req.exit_thresholds, dtype=torch.float32)
            self.min_loops[s] = req.min_loops
        quads: list[tuple[int, int, int, int]] = []
        for nb in blocks:
            s = self.slot[nb.request_id]
            for d, ids in enumerate(nb.blocks):
                quads.extend((s, d, nb.start + j, b) for j, b in enumerate(ids))
        if quads:
            at = torch.tensor(quads, dtype=torch.int64).to(self.device).T
            self.tables[at[0], at[1], at[2]] = at[3].to(torch.int32)

    def remove(self, request_id: str) -> None:
        """Free a request's slot (finished, aborted or preempted); a no-op if it has none."""
        s = self.slot.pop(request_id, None)
        if s is not None:
            self.requests.pop(request_id)
            self._free.append(s)

    def slot_mapping(
        self, seq: torch.Tensor, depth: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Flat KV slot [T] int64 of each row (its request's slot, depth and position)."""
        bs = self.block_size
        block = self.tables[seq, depth, positions // bs].long()
        return block * bs + positions % bs

    def metadata(
        self,
        seq: torch.Tensor,
        depth: torch.Tensor,
        query_start_loc: torch.Tensor,
        context_lens: torch.Tensor,
        max_query_len: int,
        max_context_len: int,
    ) -> PagedAttentionMetadata:
        """One query segment per item (its slot ``seq`` and ``depth``), block tables gathered
        on the device up to the widest context this step."""
        width = math.ceil(max_context_len / self.block_size)
        return PagedAttentionMetadata(
            block_tables=self.tables[seq, depth, :width],
            context_lens=context_lens,
            query_start_loc=query_start_loc,
            max_query_len=max_query_len,
            max_context_len=max_context_len,
        )
