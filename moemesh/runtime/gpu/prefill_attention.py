"""Attention for a large step of several sequences (prefill chunks beside decode tokens), read through the paged
KV cache's block tables: no padded [B, Tq, ...] queries, no gathered [B, Tk, ...] context, no [B, 1, Tq, Tk] mask.

    q [T, Hq, D] (the step's rows, sequence after sequence), K/V pools [slots, Hkv, D] (this step's K/V written)
      -> tiles: (sequence b, first row t0) for every BLOCK_T rows of each sequence's n_b new tokens (host-built)
      -> program (tile, kv head): its BLOCK_T rows x the GROUP = Hq / Hkv query heads of that kv head as one
         [BLOCK_T * GROUP, D] query block sharing each K/V tile; keys 0 .. c_b + t for row t (causal with the
         sequence's c_b cached tokens), online softmax over tiles of BLOCK_N keys
      -> out [T, Hq, D]

Why: step_context.py pads every sequence to the longest chunk and the longest context, so a 448-token prefill chunk
beside 64 decode tokens (the batcher's 512-token steps) computed 65 x 448 query rows against the longest context and
built a [65, 1, 448, Tk] mask: on the H200 (Qwen3-30B-A3B heads, benchmarks/results/prefill-attention-h200.md) that
step's attention took 3,418 us a layer, here 144; 8 prompts of 128-1,024 tokens 568 -> 132; 2 chunks of 2,048 after
2,048 cached 935 -> 670 (3.2x the FLOP limit). One sequence alone keeps SDPA (attention.causal_mask: cuDNN's flash
kernel, faster for one long prompt). Decode-only steps never come here (paged_attention.py, in the CUDA graphs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu.paged_attention import check_pools, kv_bytes, v_tile, widen

BLOCK_N = 64  # keys per tile
ROWS = 64  # query rows a program holds: BLOCK_T tokens x GROUP heads
# H200, Qwen3 heads (benchmarks/h200/prefill_attention.py's sweep): 64 rows on 4 warps beat 128 on 8 in all 4 steps
CONFIG = {"BLOCK_N": BLOCK_N, "ROWS": ROWS, "num_warps": 4, "num_stages": 2}


@triton.jit
def _prefill_paged(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, tile_seq_ptr, tile_t_ptr, start_ptr, new_ptr, cached_ptr,
                   scale, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_ot,
                   stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, FP8_KV: tl.constexpr = False):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.load(tile_seq_ptr + tile)
    t0 = tl.load(tile_t_ptr + tile)
    n, c, row0 = tl.load(new_ptr + b), tl.load(cached_ptr + b), tl.load(start_ptr + b)
    r = tl.arange(0, BLOCK_T * GROUP)
    t = t0 + r // GROUP  # [R] token of each query row within the chunk
    head = kv_head * GROUP + r % GROUP  # [R] its query head
    ok = t < n
    d = tl.arange(0, HEAD_DIM)
    rows = (row0 + t).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=ok[:, None],
                other=0.0)  # [R, D]
    qk_scale = scale * 1.4426950408889634  # scores in log2 units: exp2 in the softmax
    if FP8_KV:  # fp16 dots over e4m3 pools (paged_attention.py's decode kernel does the same), q pre-scaled
        q, qk_scale = (q.to(tl.float32) * qk_scale).to(tl.float16), 1.0
    limit = c + t  # [R] the last key each row sees (key 0 always: no row is all -inf)
    hi = tl.minimum(c + t0 + BLOCK_T, c + n)  # keys this tile needs: 0 .. hi - 1
    full = (c + t0 + 1) // BLOCK_N * BLOCK_N  # keys before this are seen by every row: tiles without a mask
    m_i = tl.full((BLOCK_T * GROUP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_T * GROUP,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T * GROUP, HEAD_DIM), dtype=tl.float32)
    for j0 in range(0, full, BLOCK_N):
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, k_ptr, v_ptr, table_ptr, b, kv_head, j0, limit, hi, d,
                                  stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, KV_BLOCK, BLOCK_N, False, FP8_KV)
    for j0 in range(full, hi, BLOCK_N):  # the diagonal: causal and end masks
        acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, qk_scale, k_ptr, v_ptr, table_ptr, b, kv_head, j0, limit, hi, d,
                                  stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, KV_BLOCK, BLOCK_N, True, FP8_KV)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _key_tile(acc, m_i, l_i, q, qk_scale, k_ptr, v_ptr, table_ptr, b, kv_head, j0, limit, hi, d, stride_ks, stride_kh,
              stride_vs, stride_vh, stride_tb, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              FP8_KV: tl.constexpr):
    """One tile of BLOCK_N keys from j0 into the online softmax (acc [R, D], running max m_i and sum l_i [R])."""
    j = j0 + tl.arange(0, BLOCK_N)  # [N] key positions
    j_ok = j < hi
    block = tl.load(table_ptr + b * stride_tb + j // KV_BLOCK, mask=j_ok, other=0)
    slot = block.to(tl.int64) * KV_BLOCK + j % KV_BLOCK  # [N]
    k = widen(tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=j_ok[:, None],
                      other=0), q.dtype, FP8_KV)  # [N, D]
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [R, N] float32, log2 units
    if MASKED:
        s = tl.where((j[None, :] <= limit[:, None]) & j_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = widen(v_tile(v_ptr, block, j, j_ok, kv_head, d, stride_vs, stride_vh, KV_BLOCK, FP8_KV), q.dtype,
              FP8_KV)  # [N, D]; fp8: from the token-minor V pool
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


def usable(q_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Power-of-two head_dim (one [R, D] tile) and a group that divides ROWS."""
    group = q_heads // kv_heads
    return head_dim & (head_dim - 1) == 0 and 16 <= head_dim <= 256 and ROWS % group == 0 and q_heads % kv_heads == 0


def tiles(new: list[int], group: int, device, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence [N], first row [N]) of every BLOCK_T = rows / group rows of each sequence, longest sequences'
    tiles first (their programs walk the most keys)."""
    block_t = rows // group
    pairs = [(b, t0) for b in sorted(range(len(new)), key=lambda i: -new[i]) for t0 in range(0, new[b], block_t)]
    both = torch.tensor(pairs, dtype=torch.int32).T.contiguous()
    if torch.device(device).type == "cuda":  # built at the first layer's attention: a pageable copy would wait for
        both = both.pin_memory()  # the kernels queued before it, a pinned one does not
    both = both.to(device, non_blocking=True)
    return both[0], both[1]


def prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                      starts: torch.Tensor, new: torch.Tensor, cached: torch.Tensor,
                      tile_list: tuple[torch.Tensor, torch.Tensor], kv_block: int, scale: float,
                      cfg: dict = CONFIG) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]: row t of sequence b attends to its keys 0 .. cached[b] + t through table [B, W]
    (pool slot of key j: table[b, j // kv_block] * kv_block + j % kv_block). starts / new / cached [B] int: each
    sequence's first row, its new rows, its cached tokens (this step's K/V already in the pools). tile_list from
    tiles(..., cfg["ROWS"])."""
    t, hq, d = q.shape
    hkv = k_pool.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    seq, first = tile_list
    check_pools(k_pool, v_pool)
    (k_pool, fp8), (v_pool, _) = kv_bytes(k_pool), kv_bytes(v_pool)
    if seq.numel():
        _prefill_paged[(seq.numel(), hkv)](
            q, k_pool, v_pool, out, table, seq, first, starts, new, cached, scale, q.stride(0), q.stride(1),
            k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), table.stride(0), out.stride(0),
            out.stride(1), GROUP=group, HEAD_DIM=d, KV_BLOCK=kv_block, BLOCK_T=cfg["ROWS"] // group,
            BLOCK_N=cfg["BLOCK_N"], FP8_KV=fp8, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
