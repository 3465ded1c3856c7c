"""Small steps (decode tokens and short prefill chunks, up to BUCKETS[-1] tokens in all) on CUDA over static
buffers, replayed as CUDA graphs.

Every token is one row with its own context: token i of a work at position p is the row at position p + i whose
context is the sequence's first p + i + 1 tokens, read through the sequence's block table. The norm/rope (or
attention) kernel writes every row's K/V into the pools before any row attends, so a prefill chunk's rows see each
other causally through their context lengths, as decode rows see their past (vLLM's unified varlen attention does the
same). A cached request's short tail, or a short prompt joining a decode batch, is then one replay, not an eager
step of ~25 launches per layer.

    works -> host: tokens, positions, KV slots, context lengths, block tables of n rows, padded to the bucket
             b >= n (padding rows: token 0 at position 0, written to a trash KV block no sequence owns)
          -> two host-to-device copies into static buffers
          -> graph of bucket b (captured on first use: Backbone.forward with a DecodeContext: paged attention,
             fused MoE, LM head) replayed -> static logits [b, V] float32 -> the sampling rows to the sampler

DecodeContext stands in for StepContext: the attention writes the new K/V into the pools and reads the context
through the block tables (paged_attention.py), so every shape is fixed per bucket and nothing syncs with the host.
Without graphs (a dispatch that cannot be captured) the same DecodeContext runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.paged_attention import paged_decode_attention
from moemesh.runtime.kv_cache import store

# 256 and 512 (the batcher's default max_step_tokens): an H200 step of 256 decode rows (Qwen3-30B-A3B shape, 48
# layers) took 34.5 ms eagerly in every expert dtype (host-bound) and 22.2 / 18.6 / 16.0 ms as a replay in bf16 /
# int8 / int4; 512 rows 35.1 / 36.3 ms eagerly in bf16 / int4, 26.1 / 23.1 ms replayed (benchmarks/engine_gpu.py;
# benchmarks/results/engine-h200-bucket256.md, engine-h200-bucket512.md).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A prefill row reads its sequence's whole context through the block table, where the prefill kernel reads it once
# per tile of queries: past this many (rows x context) token reads in a step's prefill chunks, the prefill path is
# the faster one. H200, 48 layers, a prompt's tail after a cached prefix (benchmarks/h200/cached_tail.py,
# benchmarks/results/cached-tail-h200.md), graphs / prefill path ms: 250 rows after 4,000 tokens (1.06M reads) 26.7 /
# 45.5, 128 after 12,000 (1.55M) 35.1 / 54.2, 250 after 12,000 (3.06M) 58.8 / 49.0. Decode rows (one token of a
# sequence) always take the graphs: the other path gathers their whole context.
MAX_PREFILL_READS = 2_000_000


@dataclass
class DecodeContext:
    """One decode step's index tensors on the device (see the module doc); B rows, one token each."""

    positions: torch.Tensor  # [B] int64 position of the new token
    slots: torch.Tensor  # [B] int64 pool slot its K/V is written to
    block_tables: torch.Tensor  # [B, W] int32
    seq_lens: torch.Tensor  # [B] int32 tokens in the context, the new one included
    kv_block: int
    paged_decode: bool = True  # Attention checks this to take attend() instead of the gather + SDPA path

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               pools: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] -> [B, Hq, D]; writes k/v into the layer's pools first."""
        store(pools[0], self.slots, k)
        store(pools[1], self.slots, v)
        return self.read(q, pools, scale)

    def read(self, q: torch.Tensor, pools: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
        """attend() when the new K/V are already in the pools (the fused norm/rope kernel wrote them)."""
        return paged_decode_attention(q, pools[0], pools[1], self.block_tables, self.seq_lens, scale, self.kv_block)


def fits(works: list) -> bool:
    """True for a step whose tokens (decode tokens and prefill chunks together) fit the largest bucket, with its
    prefill chunks' context reads within MAX_PREFILL_READS."""
    if not all(w.token_ids for w in works) or sum(len(w.token_ids) for w in works) > BUCKETS[-1]:
        return False
    reads = sum(len(w.token_ids) * (w.position + len(w.token_ids)) for w in works if len(w.token_ids) > 1)
    return reads <= MAX_PREFILL_READS


def bucket_for(n: int) -> int | None:
    return next((b for b in BUCKETS if b >= n), None)


class DecodeRunner:
    """Runs decode steps for up to BUCKETS[-1] sequences; `graphs` False: eagerly, with the same static buffers."""

    def __init__(self, backbone, dispatch, pools: list, block_size: int, table_width: int, trash_block: int,
                 device: torch.device, graphs: bool) -> None:
        self.backbone, self.dispatch, self.pools = backbone, dispatch, pools
        self.block_size, self.trash_block, self.graphs_on = block_size, trash_block, graphs
        m, w = BUCKETS[-1], table_width
        pinned = device.type == "cuda"  # pinned staging: the host-to-device copies stay asynchronous
        self.host_rows = torch.zeros(4, m, dtype=torch.int64, pin_memory=pinned)  # tokens, positions, slots, lens
        self.host_tables = torch.zeros(m, w, dtype=torch.int32, pin_memory=pinned)
        self.staged_tables = np.asarray(self.host_tables)  # host memory shared, no copy: rows filled through numpy
        self.rows = torch.zeros(4, m, dtype=torch.int64, device=device)
        self.lens = torch.ones(m, dtype=torch.int32, device=device)
        self.tables = torch.full((m, w), trash_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.split_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # ping-pong halves (run's second)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def takes(self, works: list) -> bool:
        return fits(works)

    @staticmethod
    def rows_for(n: int) -> int:
        """Rows every MoE layer carries for n tokens (the bucket: the dispatch sees padded batches)."""
        return bucket_for(n)

    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]],
            keep: list[int] | None = None, second=None, fed=None) -> torch.Tensor:
        """n rows: their tokens, positions and (their sequence's) block tables -> logits [n, V] float32, or only
        the rows `keep` lists (each sampling sequence's last row) [len(keep), V]. second: an ExpertDispatch for
        ping-pong halves (runtime/micro_batch.py): bucket rows [:b/2] on this runner's dispatch, [b/2:b] on
        `second`. A cut inside a sequence's chunk is fine: per layer A's attention (and its K/V writes) runs
        before B's, and A holds the earlier rows. fed (source [M] int64 on the device, src [F], rows [F] int64 on
        the host): row rows[j] takes token source[src[j]] on the device instead of tokens[rows[j]] (a launched
        step's sampled tokens, runtime/step_ahead.py)."""
        n = len(tokens)
        b = bucket_for(n)
        if b is None:
            raise ValueError(f"decode runner takes at most {BUCKETS[-1]} tokens, got {n}")
        width = self._stage(tokens, positions, tables, b)
        self.rows[:, :b].copy_(self.host_rows[:, :b], non_blocking=True)
        self.tables[:b, :width].copy_(self.host_tables[:b, :width], non_blocking=True)
        if fed is not None:
            source, src, rows = fed
            dev = source.device
            self.rows[0].index_copy_(0, rows.to(dev, non_blocking=True),
                                     source.index_select(0, src.to(dev, non_blocking=True)))
        self.lens[:b].copy_(self.rows[3, :b])
        with pdl.enabled(b <= pdl.MAX_ROWS):  # small buckets: each kernel launches while the last one drains
            if not self.graphs_on:
                logits = self._forward(b, second)
            else:
                graphs = self.graphs if second is None else self.split_graphs
                if b not in graphs:
                    graphs[b] = self._capture(b, second)
                graph, logits = graphs[b]
                graph.replay()
        if keep is not None and keep != list(range(n)):
            return logits[torch.tensor(keep, dtype=torch.int64).to(logits.device, non_blocking=True)]
        return logits[:n].clone()  # the next replay overwrites the static output

    def _stage(self, tokens: list[int], positions: list[int], tables: list[list[int]], b: int) -> int:
        """Fill the pinned host buffers for bucket b; returns the block-table width in use."""
        n, bs = len(tokens), self.block_size
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        trash = self.trash_block * bs
        pad = b - n
        self.host_rows[:, :b] = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [trash] * pad,
                                              [p + 1 for p in positions] + [1] * pad], dtype=torch.int64)
        width = max(len(t) for t in tables)
        staged = self.staged_tables  # row by row through numpy: a nested-list torch.tensor of 64 tables of 262 blocks
        staged[:b, :width] = self.trash_block  # (context 4,096) took 1.3 ms a step on the host, this 0.4
        for i, table in enumerate(tables):
            staged[i, :len(table)] = table
        return width

    def _forward(self, b: int, second=None) -> torch.Tensor:
        if second is None:
            ctx = DecodeContext(self.rows[1, :b], self.rows[2, :b], self.tables[:b], self.lens[:b], self.block_size)
            return self.backbone(self.rows[0, :b], ctx, self.dispatch, self.pools)  # [b, V] float32
        from moemesh.runtime.micro_batch import split_logits

        halves = [slice(0, b // 2), slice(b // 2, b)]
        ctx = [DecodeContext(self.rows[1, h], self.rows[2, h], self.tables[h], self.lens[h], self.block_size)
               for h in halves]
        return split_logits(self.backbone, [(self.rows[0, halves[0]], ctx[0], self.dispatch),
                                            (self.rows[0, halves[1]], ctx[1], second)], self.pools)  # [b, V]

    def _capture(self, b: int, second=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (Triton compiles, allocator settles) on a side stream, then capture. The static inputs already
        hold this step's data, so the warm-up's KV writes are the ones the replay repeats."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b, second)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(b, second)
        return graph, logits
