"""Decode attention over the paged KV cache (Triton): one query token per sequence, grouped-query heads.

    q [B, Hq, D] (rotated), K/V pools [slots, Hkv, D], block_tables [B, W] int32, seq_lens [B] int32
      -> one program per (sequence, kv head): the GROUP = Hq / Hkv query heads of that kv head share each K/V
         tile, read through the block table (token j of sequence b lives in slot table[b, j // bs] * bs + j % bs)
      -> online softmax over tiles of BLOCK_N tokens -> out [B, Hq, D]

Shapes are fixed (W is the table width for max_context) and the loop bound is read on the device, so the launch
can be captured in a CUDA graph; no context is gathered into a padded copy (step_context.py does that for prefill
and on the CPU). One program walks a whole context: long contexts at small batch would want a split over the
context (flash-decoding), not done here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, lens_ptr, scale,
                  stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_ob, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g  # [G] query heads served by this kv head
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    seq_len = tl.load(lens_ptr + b)
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [N] token positions of this tile
        ok = pos < seq_len
        block = tl.load(table_ptr + b * stride_tb + pos // KV_BLOCK, mask=ok, other=0)
        slot = block.to(tl.int64) * KV_BLOCK + pos % KV_BLOCK  # [N]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [G, N] float32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has at least one valid token
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None])


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, kv_block: int, block_n: int = 64) -> torch.Tensor:
    """q [B, Hq, D]; pools [slots, Hkv, D]; block_tables [B, W] int32; seq_lens [B] int32 (>= 1, the new token
    included, its K/V already written) -> [B, Hq, D] in q's dtype."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    if hq % hkv or d & (d - 1) or k_pool.stride(2) != 1 or v_pool.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError(f"paged decode needs Hq % Hkv == 0, a power-of-two head dim and contiguous heads, got "
                         f"q {tuple(q.shape)}, pools {tuple(k_pool.shape)}")
    group = hq // hkv
    out = torch.empty_like(q)
    _paged_decode[(b, hkv)](
        q, k_pool, v_pool, out, block_tables, seq_lens, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, KV_BLOCK=kv_block, BLOCK_N=block_n,
        num_warps=4, num_stages=2,
    )
    return out
