"""The row movement of prefill_moe.py: hidden rows into per-expert runs (A), and each token's slots summed back.

Two ways to build A [EM, H] (rows of one expert contiguous, each run padded to BLOCK_M) with the same Alignment
(moe_align.py's layout: sorted_ids [EM] pair per row, P on padding; block_expert [EM / BM]; rows_used [1]) and
inv [P] (the row of each pair hosted here):

    permute:        moe_align's align / align_small (about 20 torch launches above 4,096 pairs), then one copy
                    kernel over the rows (padding rows zeroed)
    permute_fused:  a memset, _count_experts (per-chunk histograms added into counts [E]; sorted_ids filled with P),
                    _claim_rows (each program: padded prefix sums of counts, a row per pair claimed with an atomic
                    increment of its expert's fill counter, the hidden row copied there). Rows within an expert land
                    in any order and padding rows of A are left unwritten: every GEMM row is independent and padding
                    rows are never read back (gather_sum reads through inv; the atomic combine masks them).

gather_sum: out[t] = sum_k y[inv[t*K + k]] in float32, over the slots hosted here (local id >= 0); without inv
(fused_moe.slot_sum) y[t*K + k].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.gpu.moe_align import SMALL_PAIRS, Alignment, align, align_small, padded_rows

ROWS, BLOCK_H = 16, 256  # rows x columns per copy step


@triton.jit
def _permute_rows(h_ptr, a_ptr, inv_ptr, sorted_ptr, rows_used_ptr, num_pairs, hidden,
                  TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """A[r, cols] = hidden[pair // K, cols] for ROWS rows x BLOCK_H columns; column block 0 also writes inv."""
    r0 = tl.program_id(0) * ROWS
    if r0 >= tl.load(rows_used_ptr):
        return  # rows past the padded runs: never read by the GEMMs
    rows = r0 + tl.arange(0, ROWS)
    pair = tl.load(sorted_ptr + rows)  # [ROWS] int64
    ok = pair < num_pairs
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = ok[:, None] & (cols < hidden)[None, :]
    x = tl.load(h_ptr + (pair // TOP_K)[:, None] * hidden + cols[None, :], mask=mask, other=0.0)
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], x, mask=(cols < hidden)[None, :])
    if tl.program_id(1) == 0:
        tl.store(inv_ptr + pair, rows, mask=ok)


@triton.jit
def _count_experts(ids_ptr, counts_ptr, sorted_ptr, num_pairs, num_experts, em,
                   CHUNK: tl.constexpr, BINS: tl.constexpr):
    """counts[e] += pairs of expert e in this program's CHUNK pairs; sorted_ids = P on a grid-strided share."""
    pid = tl.program_id(0)
    lanes = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + lanes, mask=lanes < num_pairs, other=-1).to(tl.int32)
    counts = tl.histogram(tl.where(ids >= 0, ids, BINS - 1), BINS)  # last bin: hosted elsewhere / past P
    bins = tl.arange(0, BINS)
    tl.atomic_add(counts_ptr + bins, counts, mask=bins < num_experts, sem="relaxed")
    for r0 in range(pid * CHUNK, em, tl.num_programs(0) * CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + rows, tl.full((CHUNK,), num_pairs, tl.int64), mask=rows < em)


@triton.jit
def _claim_rows(ids_ptr, h_ptr, a_ptr, inv_ptr, sorted_ptr, counts_ptr, filled_ptr, expert_ptr, rows_used_ptr,
                num_pairs, num_experts, hidden, em, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                BINS: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """ROWS pairs: each claims the next free row of its expert's run and copies its token's hidden row there."""
    bins = tl.arange(0, BINS)
    padded = (tl.load(counts_ptr + bins, mask=bins < num_experts, other=0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)  # [BINS] end row of each expert's run
    pairs = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
    here = ids >= 0
    start = tl.sum(tl.where(bins[None, :] < ids[:, None], padded[None, :], 0), 1)  # [ROWS] run start
    row = (start + tl.atomic_add(filled_ptr + ids, 1, mask=here, sem="relaxed")).to(tl.int64)
    tl.store(sorted_ptr + row, pairs.to(tl.int64), mask=here)
    tl.store(inv_ptr + pairs, row.to(tl.int32), mask=here)
    src = (pairs // TOP_K).to(tl.int64)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = here[:, None] & (cols < hidden)[None, :]
        x = tl.load(h_ptr + src[:, None] * hidden + cols[None, :], mask=mask)
        tl.store(a_ptr + row[:, None] * hidden + cols[None, :], x, mask=mask)
    if tl.program_id(0) == 0:  # block -> expert: each expert writes its run's blocks, the blocks past them -1
        used = tl.sum(padded, 0)
        tl.store(rows_used_ptr, used.to(tl.int64))
        runs, first = padded // BLOCK_M, (ends - padded) // BLOCK_M  # [BINS] (align_kernel.py: no [blocks, BINS])
        for j in range(0, tl.max(runs, 0)):
            tl.store(expert_ptr + first + j, bins.to(tl.int64), mask=j < runs)
        for b0 in range(used // BLOCK_M, em // BLOCK_M, BINS):
            blocks = b0 + bins
            tl.store(expert_ptr + blocks, tl.full((BINS,), -1, tl.int64), mask=blocks < em // BLOCK_M)


def permute(hidden: torch.Tensor, local_ids: torch.Tensor, num_experts: int, block_m: int):
    """(alignment, A [EM, H] rows grouped by expert and padded per expert to block_m (zeros), inv [P] int32: the
    row of each pair hosted here). moe_align's alignment, then one copy kernel."""
    t, k = local_ids.shape
    h = hidden.shape[1]
    al = (align_small if t * k <= SMALL_PAIRS else align)(local_ids, num_experts, block_m)
    em = al.sorted_ids.numel()
    a = torch.empty(em, h, dtype=hidden.dtype, device=hidden.device)  # [EM, H]
    inv = torch.empty(t * k, dtype=torch.int32, device=hidden.device)  # [P]
    _permute_rows[(em // ROWS, triton.cdiv(h, BLOCK_H))](hidden.contiguous(), a, inv, al.sorted_ids, al.rows_used,
                                                         t * k, h, TOP_K=k, ROWS=ROWS, BLOCK_H=BLOCK_H, num_warps=4)
    return al, a, inv


def permute_fused(hidden: torch.Tensor, local_ids: torch.Tensor, num_experts: int, block_m: int):
    """permute's outputs in three launches (padding rows of A unwritten; rows within an expert in any order)."""
    t, k = local_ids.shape
    p, h, dev = t * k, hidden.shape[1], hidden.device
    em = padded_rows(p, num_experts, block_m)
    bins = triton.next_power_of_2(num_experts + 1)
    counters = torch.zeros(2, num_experts, dtype=torch.int32, device=dev)  # counts, fill cursors
    al = Alignment(torch.empty(em, dtype=torch.int64, device=dev),
                   torch.empty(em // block_m, dtype=torch.int64, device=dev),
                   torch.empty(1, dtype=torch.int64, device=dev), p, block_m)
    ids = local_ids.reshape(-1).contiguous()
    chunk = 1024
    _count_experts[(triton.cdiv(p, chunk),)](ids, counters[0], al.sorted_ids, p, num_experts, em, CHUNK=chunk,
                                             BINS=bins, num_warps=4)
    a = torch.empty(em, h, dtype=hidden.dtype, device=dev)  # [EM, H]
    inv = torch.empty(p, dtype=torch.int32, device=dev)  # [P]
    _claim_rows[(triton.cdiv(p, ROWS),)](ids, hidden.contiguous(), a, inv, al.sorted_ids, counters[0], counters[1],
                                        al.block_expert, al.rows_used, p, num_experts, h, em, TOP_K=k,
                                        BLOCK_M=block_m, BINS=bins, ROWS=ROWS, BLOCK_H=BLOCK_H, num_warps=4)
    return al, a, inv


@triton.jit
def _gather_sum(y_ptr, inv_ptr, ids_ptr, out_ptr, hidden, TOP_K: tl.constexpr, KP: tl.constexpr,
                BLOCK_H: tl.constexpr, INV: tl.constexpr = True, PDL: tl.constexpr = False):
    """out[t, cols] = sum over the token's K pairs hosted here of y[inv[pair], cols] (INV; else y[pair, cols]), in
    float32, in slot order. KP: K rounded up to a power of two (the padded slots are masked)."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    slots = t * TOP_K + k
    hosted = (tl.load(ids_ptr + slots, mask=k < TOP_K, other=-1) >= 0) & (k < TOP_K)  # rows of others: unwritten
    rows = slots  # [KP]
    if INV:
        rows = tl.load(inv_ptr + slots, mask=hosted, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = hosted[:, None] & (cols < hidden)[None, :]
    y = tl.load(y_ptr + rows[:, None] * hidden + cols[None, :], mask=mask, other=0.0)  # [KP, BLOCK_H]
    tl.store(out_ptr + t * hidden + cols, tl.sum(y.to(tl.float32), 0), mask=cols < hidden)


def gather_sum(y: torch.Tensor, inv: torch.Tensor | None, local_ids: torch.Tensor, out: torch.Tensor,
               **launch) -> torch.Tensor:
    """out [T, H] float32 = per token, the sum of its hosted pairs' rows of y (inv [P]: the row of each pair in y
    [EM, H]; None: y [P, H] holds pair p at row p). launch: prefill_moe._pdl's PDL options."""
    t, k = local_ids.shape
    h = out.shape[1]
    if t:
        _gather_sum[(t, triton.cdiv(h, 1024))](y, inv if inv is not None else y, local_ids.reshape(-1).contiguous(),
                                               out, h, TOP_K=k, KP=triton.next_power_of_2(k), BLOCK_H=1024,
                                               INV=inv is not None, num_warps=4, **launch)
    return out
