"""One shard, several routers (M:N): their blocks of the same layer computed as one expert batch.

Every attachment's serving thread calls `forward` with its block (rows of its own shared-memory region). The
threads take turns on one lock; the thread that holds it computes every block waiting at that moment: the blocks of
one layer concatenated into one batch (one bank forward, then each block's output rows copied back to its own
`out`), blocks of different layers one after the other. A thread whose block was computed by an earlier holder
returns at once. With one router there is never a second block waiting: its block runs in place, as before (no
copy, no extra thread hand-off).

Invariants: a block is computed exactly once, by the lock holder, and marked done before the lock is released;
each block's inputs are checked alone (ExpertShard.check), so a bad block fails only its own router's step.
Shapes: hidden [T_i, H] compute dtype, ids [T_i, K] int32, weights [T_i, K] float32, out [T_i, H]; a merged batch
is [sum T_i, H].
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from services.expert import metrics
from services.expert.shard import ExpertShard


@dataclass(eq=False)
class _Block:
    layer: int
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor
    done: bool = False
    error: BaseException | None = None
    seconds: float = 0.0  # compute time of the batch this block was part of
    merged_with: int = 0  # other blocks in that batch


class MergedCompute:
    """ExpertShard.forward for several concurrent callers, merging same-layer blocks (see the module doc)."""

    def __init__(self, shard: ExpertShard) -> None:
        self._shard = shard
        self._turn = threading.Lock()  # held while computing
        self._pending_lock = threading.Lock()  # guards _pending only (never held while computing)
        self._pending: list[_Block] = []
        self.batches = 0  # bank forwards run
        self.merged_blocks = 0  # blocks computed in a batch with another router's block

    def forward(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor) -> float:
        """Writes the block's output into `out`; returns the compute seconds of its batch; raises its error."""
        if self._turn.acquire(blocking=False):  # nobody computing: the one-router case, without the bookkeeping
            try:
                if not self._pending:  # a block queued after this check is computed by its own thread afterwards
                    start = time.perf_counter()
                    self._shard.forward(layer, hidden, ids, weights, out=out)
                    self.batches += 1
                    return time.perf_counter() - start
            finally:
                self._turn.release()
        block = _Block(layer, hidden, ids, weights, out)
        with self._pending_lock:
            self._pending.append(block)
        with self._turn:
            if not block.done:
                with self._pending_lock:
                    waiting, self._pending = self._pending, []
                self._compute(waiting)
        if block.error is not None:
            raise block.error
        return block.seconds

    def _compute(self, blocks: list[_Block]) -> None:
        by_layer: dict[tuple[int, int], list[_Block]] = {}  # (layer, K) -> blocks that can share a batch
        if len(blocks) == 1:  # one router, or no overlap: ExpertShard.forward checks it (no second check here)
            by_layer[(blocks[0].layer, 0)] = blocks
            blocks = []
        for block in blocks:
            try:
                self._shard.check(block.layer, block.hidden, block.ids, block.weights)
                by_layer.setdefault((block.layer, block.ids.shape[1]), []).append(block)
            except Exception as exc:  # noqa: BLE001 -- this block's own error, raised in its caller
                block.error, block.done = exc, True
        for (layer, _), group in by_layer.items():
            start = time.perf_counter()
            try:
                self._run(layer, group)
            except Exception as exc:  # noqa: BLE001 -- the batch failed: every block in it fails
                for block in group:
                    block.error = exc
            seconds = time.perf_counter() - start
            self.batches += 1
            if len(group) > 1:
                self.merged_blocks += len(group)
                metrics.MERGED_BLOCKS.inc(len(group))
            for block in group:
                block.seconds, block.merged_with, block.done = seconds, len(group) - 1, True

    def _run(self, layer: int, group: list[_Block]) -> None:
        if len(group) == 1:  # the common case: in place, no copy
            b = group[0]
            self._shard.forward(layer, b.hidden, b.ids, b.weights, out=b.out)
            return
        hidden = torch.cat([b.hidden for b in group])  # [sum T_i, H]
        ids = torch.cat([b.ids for b in group])  # [sum T_i, K]
        weights = torch.cat([b.weights for b in group])  # [sum T_i, K]
        result = self._shard.forward(layer, hidden, ids, weights)  # [sum T_i, H]
        row = 0
        for b in group:
            b.out.copy_(result[row:row + b.hidden.shape[0]])
            row += b.hidden.shape[0]
