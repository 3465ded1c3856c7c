"""The Triton kernel of moe_align.align_small: one program sorts up to a few thousand (token, slot) pairs by expert
(see moe_align.py for the layout it produces)."""

from __future__ import annotations

import triton
import triton.language as tl

from moemesh.runtime.gpu.pdl import enter


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, rows_used_ptr, cursor_ptr, p, e, em,
                  BLOCK_M: tl.constexpr, PB: tl.constexpr, BINS: tl.constexpr, PDL: tl.constexpr = False):
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    lanes = tl.arange(0, PB)
    valid = lanes < p
    ids = tl.load(ids_ptr + lanes, mask=valid, other=-1).to(tl.int32)
    bucket = tl.where(ids >= 0, ids, e)  # [PB] expert, or e: hosted elsewhere
    bucket = tl.where(valid, bucket, BINS - 1)
    counts = tl.histogram(bucket, BINS)  # [BINS]
    bins = tl.arange(0, BINS)
    padded = tl.where(bins < e, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    starts = tl.cumsum(padded, 0) - padded  # [BINS] first row of each expert's run
    tl.store(cursor_ptr + bins, starts)  # the claim cursors
    used = tl.sum(padded, 0)
    tl.store(rows_used_ptr, used.to(tl.int64))
    for start in range(0, em, PB):  # every row is padding until claimed
        rows = start + lanes
        tl.store(sorted_ptr + rows, p.to(tl.int64), mask=rows < em)
    # block -> expert: each expert (one bin per lane) writes its own blocks, the blocks past the runs get -1. (A
    # [32 blocks, BINS] count per 32 blocks took ~2,200 of a warp's ~2,700 instructions at 512 pairs and BLOCK_M 8,
    # every one a cross-warp reduction: 10 us for this one program on the H200.)
    runs = padded // BLOCK_M  # [BINS] blocks of each run (0 past e)
    first = starts // BLOCK_M
    for j in range(0, tl.max(runs, 0)):
        tl.store(block_expert_ptr + first + j, bins.to(tl.int64), mask=j < runs)
    nblocks = em // BLOCK_M
    for start in range(used // BLOCK_M, nblocks, PB):
        blocks = start + lanes
        tl.store(block_expert_ptr + blocks, tl.full((PB,), -1, tl.int64), mask=blocks < nblocks)
    tl.debug_barrier()  # cursors and padding stores visible to the whole program before the claims
    here = valid & (ids >= 0)
    # relaxed: Triton's default (acq_rel) fences every atomic (MEMBAR + L1 invalidation); the barrier already orders
    # the cursor stores before them (bar.sync performs them for the whole program). H200, 512 pairs, ncu: 10.9 ->
    # 10.0 us. The program stays latency-bound (22K instructions issued in 21K cycles, 0.2% of issue slots busy):
    # dependent round trips to memory, one program on the step's critical path.
    row = tl.atomic_add(cursor_ptr + bucket, 1, mask=here, sem="relaxed")
    tl.store(sorted_ptr + row, lanes.to(tl.int64), mask=here)
