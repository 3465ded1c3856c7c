"""Sort (token, slot) pairs by expert on the device, padded per expert to the GEMM's row block (vLLM's
moe_align_block_size), with fixed-size outputs and no host synchronisation, so that it runs inside a CUDA graph.

    local ids [T, K] (-1: expert not hosted here) -> per pair p = t*K + k its expert bucket (E for "not here")
    -> counts per expert -> each expert's run padded to a multiple of block_m -> rank of each pair within its
    expert -> sorted_ids [EM] (pair ids; P marks padding), block_expert [EM / block_m] (-1 past the end),
    rows_used [1] (padded rows actually used).

Two implementations: align_small (one Triton program, decode sizes) and align (torch ops, a stable sort, any size).
EM, the buffer length, depends only on P = T*K, E and block_m: at most min(P, E) experts are non-empty and each
adds fewer than block_m padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    sorted_ids: torch.Tensor  # [EM] int64 pair id per GEMM row (P = padding row)
    block_expert: torch.Tensor  # [EM / block_m] int64 local expert of each row block (-1: unused block)
    rows_used: torch.Tensor  # [1] int64 rows of sorted_ids in use (a multiple of block_m)
    num_pairs: int  # P = T * K
    block_m: int


def padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """EM: rows the sorted buffer needs in the worst case, a multiple of block_m."""
    rows = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align(local_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """local_ids [T, K] integer local expert ids (-1: not hosted). All outputs stay on local_ids' device."""
    dev = local_ids.device
    flat = local_ids.reshape(-1).long()  # [P]
    p = flat.numel()
    bucket = torch.where(flat >= 0, flat, num_experts)  # [P] in [0, E]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, bucket,
                                                                                      torch.ones_like(bucket))
    order = torch.argsort(bucket, stable=True)  # [P] pairs grouped by expert, "not here" last
    sorted_bucket = bucket[order]
    rank = torch.arange(p, device=dev) - (counts.cumsum(0) - counts)[sorted_bucket]  # [P] order within its expert
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E] end row of each expert's run
    starts = ends - padded  # [E]
    em = padded_rows(p, num_experts, block_m)
    here = sorted_bucket < num_experts
    dest = torch.where(here, starts[sorted_bucket.clamp(max=num_experts - 1)] + rank, em)  # [P]; em: the trash row
    sorted_ids = torch.full((em + 1,), p, dtype=torch.int64, device=dev)
    sorted_ids.scatter_(0, dest, order)
    block_starts = torch.arange(0, em, block_m, device=dev)  # [EM / block_m]
    block_expert = torch.searchsorted(ends, block_starts, right=True)  # first expert whose run ends past the start
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return Alignment(sorted_ids[:em], block_expert, ends[-1:], p, block_m)


SMALL_PAIRS = 4096  # up to this many pairs one Triton program aligns them (decode); beyond, the torch version


def align_small(local_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """align() in one launch (one program): histogram, padded prefix sums, each pair's row claimed with an atomic
    increment of its expert's cursor (rows within an expert land in any order; every GEMM row is independent, so
    results do not depend on it), block -> expert by counting the runs that end before the block."""
    import triton

    from moemesh.runtime.gpu import pdl
    from moemesh.runtime.gpu.align_kernel import _align_kernel

    p = local_ids.numel()
    em = padded_rows(p, num_experts, block_m)
    dev = local_ids.device
    sorted_ids = torch.empty(em, dtype=torch.int64, device=dev)
    block_expert = torch.empty(em // block_m, dtype=torch.int64, device=dev)
    rows_used = torch.empty(1, dtype=torch.int64, device=dev)
    bins = triton.next_power_of_2(num_experts + 2)  # bin E: hosted elsewhere, last bin: lanes past P
    cursor = torch.empty(bins, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](local_ids, sorted_ids, block_expert, rows_used, cursor, p, num_experts, em,
                        BLOCK_M=block_m, PB=triton.next_power_of_2(p), BINS=bins, num_warps=8,
                        **pdl.launch())
    return Alignment(sorted_ids, block_expert, rows_used, p, block_m)
