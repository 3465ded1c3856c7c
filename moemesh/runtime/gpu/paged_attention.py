"""Decode attention over the paged KV cache (Triton): one query token per sequence, grouped-query heads.

    q [B, Hq, D] (rotated), K/V pools [slots, Hkv, D], block_tables [B, W] int32, seq_lens [B] int32
      -> one program per (sequence, kv head): the GROUP = Hq / Hkv query heads of that kv head share each K/V
         tile, read through the block table (token j of sequence b lives in slot table[b, j // bs] * bs + j % bs)
      -> online softmax over tiles of BLOCK_N tokens -> out [B, Hq, D]

Shapes are fixed (W is the table width for max_context) and the loop bound is read on the device, so the launch
can be captured in a CUDA graph; no context is gathered into a padded copy (step_context.py does that for prefill
and on the CPU).

Small batches split each context (flash-decoding): with B * Hkv programs far below the SM count, one program walking
a whole context would leave the GPU idle (batch 1, 4 kv heads: 4 programs). Then SPLITS programs per (sequence, kv
head) each take an equal share of the tiles and write their unnormalised partial (max, sum, acc) to a scratch
buffer, and a second kernel combines them: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.

fp8 pools (kv_cache.py) arrive as their bytes (uint8: masked loads fill 0, which Triton's interpreter cannot cast to
fp8) and are widened to fp16 in the dots' register layout (`widen`; the dots run in fp16 with q pre-scaled, float32
accumulators): half the bytes of the bf16 cache. Their V pool keeps each block's tokens innermost ([blocks, Hkv, D,
bs], kv_cache.py), so a tile's V is read as [N, D] with runs of KV_BLOCK contiguous bytes along N (`v_tile`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.kv_cache import FP8, token_minor


# 4 e4m3 bytes -> 4 fp16 (two words): one cvt per two values (Triton's own e4m3 -> fp16 takes the same cvt but
# its bf16 route a second per value). Off under the interpreter (no PTX).
E4M3_F16 = tl.constexpr("""{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}""")
ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def widen(x, dtype, FP8_KV: tl.constexpr):
    """A tile loaded from a KV pool -> dtype: FP8_KV, the pool's e4m3 bytes (uint8) as fp16 (dtype must be fp16)."""
    if FP8_KV:
        if ASM:
            return tl.inline_asm_elementwise(E4M3_F16, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
        return x.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return x.to(dtype)


@triton.jit
def narrow(x, dtype, FP8_KV: tl.constexpr):
    """x [float32] as the cache stores it (kv_cache.narrow): rounded to the model's dtype, then FP8_KV: saturated at
    +-448 and rounded to e4m3, as bytes."""
    x = x.to(dtype)
    if FP8_KV:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return x


@triton.jit
def v_tile(v_ptr, block, pos, ok, kv_head, d, stride_vs, stride_vh, KV_BLOCK: tl.constexpr, FP8_KV: tl.constexpr):
    """V [N, D] of tokens `pos` [N] (block: their KV blocks [N]; ok: which exist). FP8_KV: from the token-minor pool
    [blocks, Hkv, D, KV_BLOCK] (stride_vs: a block's), read without a mask (a token past the context reads a slot of
    its block, or of block 0, which holds a finite value; its probability is 0) so that the runs of KV_BLOCK bytes
    along N (pos starts a tile at a multiple of KV_BLOCK) load as vectors. Else [slots, Hkv, D]."""
    if FP8_KV:
        offs = block.to(tl.int64)[:, None] * stride_vs + kv_head * stride_vh + d[None, :] * KV_BLOCK + (
            pos % KV_BLOCK)[:, None]  # [N, D]
        return tl.load(v_ptr + tl.max_contiguous(tl.multiple_of(offs, [KV_BLOCK, 1]), [KV_BLOCK, 1]))
    slot = block.to(tl.int64) * KV_BLOCK + pos % KV_BLOCK  # [N]
    return tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=ok[:, None], other=0.0)


def kv_bytes(pool: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(what a kernel is given for the pool, FP8_KV): an fp8 pool as its bytes (see the module doc)."""
    return (pool.view(torch.uint8), True) if pool.dtype == FP8 else (pool, False)


def check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    """fp8 pools come as kv_cache.KVCache makes them: K [slots, Hkv, D], V [blocks, Hkv, D, bs]; else both
    [slots, Hkv, D]."""
    if (k_pool.dtype == FP8) != (token_minor(v_pool) > 0) or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"K/V pools must both be fp8 (V [blocks, Hkv, D, bs]) or both [slots, Hkv, D] of one dtype, "
                         f"got {k_pool.dtype} {tuple(k_pool.shape)} and {v_pool.dtype} {tuple(v_pool.shape)}")


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, lens_ptr, part_ptr, scale,
                  stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_ob, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, FP8_KV: tl.constexpr = False,
                  PDL: tl.constexpr = False):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Before the PDL wait: the context length and the first tile's block-table entries. Both are written before the
    # step (host copies); no kernel of the step writes them, so the first K/V loads wait on one dependent load
    # fewer after it. H200 (small_kernels.py, us per layer, context 130 / 2000): 5.22 / 7.64 against 5.06 / 8.25;
    # batch-1 engine graph with it and one norm_rope program per head 2.46 / 2.00 ms (bf16 / int4), 2.52 / 2.05 before.
    seq_len = tl.load(lens_ptr + b)
    tiles = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), SPLITS)  # tiles per split
    lo = split * tiles * BLOCK_N
    hi = tl.minimum(lo + tiles * BLOCK_N, seq_len)
    first = lo + tl.arange(0, BLOCK_N)
    block = tl.load(table_ptr + b * stride_tb + first // KV_BLOCK, mask=first < hi, other=0)  # [N]
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py); q is the last kernel's output
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g  # [G] query heads served by this kv head
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    if FP8_KV:  # fp16 dots: e4m3 -> fp16 is one cvt per two values (bf16 would take a second per value)
        q, scale = (q.to(tl.float32) * scale).to(tl.float16), 1.0  # pre-scaled: |q| / sqrt(D) far below 65504
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [N] token positions of this tile
        ok = pos < hi
        nxt = pos + BLOCK_N  # this tile's entries were loaded a tile ahead; load the next tile's now
        this, block = block, tl.load(table_ptr + b * stride_tb + nxt // KV_BLOCK, mask=nxt < hi, other=0)
        slot = this.to(tl.int64) * KV_BLOCK + pos % KV_BLOCK  # [N]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=ok[:, None], other=0)
        v = v_tile(v_ptr, this, pos, ok, kv_head, d, stride_vs, stride_vh, KV_BLOCK, FP8_KV)
        k, v = widen(k, q.dtype, FP8_KV), widen(v, q.dtype, FP8_KV)  # [N, D] each
        s = tl.dot(q, tl.trans(k)) * scale  # [G, N] float32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has at least one valid token
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:  # partial [B, Hq, SPLITS, D + 2]: acc, then m and l (an empty split leaves m = -inf, l = 0)
        row = ((b * (tl.num_programs(1) * GROUP) + heads) * SPLITS + split) * (HEAD_DIM + 2)  # [G]
        tl.store(part_ptr + row[:, None] + d[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ptr + row + HEAD_DIM, m_i, mask=g_ok)
        tl.store(part_ptr + row + HEAD_DIM + 1, l_i, mask=g_ok)


@triton.jit
def _combine_splits(part_ptr, out_ptr, stride_ob, stride_oh, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PDL: tl.constexpr = False):
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    b = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    rows = ((b * tl.num_programs(1) + head) * SPLITS + s) * (HEAD_DIM + 2)  # [S]
    m = tl.load(part_ptr + rows + HEAD_DIM)
    l = tl.load(part_ptr + rows + HEAD_DIM + 1)
    w = tl.exp(m - tl.max(m, 0))  # [S]; empty splits (m = -inf) weigh 0, and split 0 is never empty
    acc = tl.load(part_ptr + rows[:, None] + d[None, :])  # [S, D]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# Tried and removed (2026-11-30): the last split of each (sequence, kv head) combining instead of _combine_splits
# (a bar.sync + acq_rel atomic ticket per program, the last one reading the GROUP heads' partials with .cg loads):
# H200 9.28 / 12.03 us per layer at context 130 / 2000 against 5.51 / 7.73 for the two launches; batch-1 graph of
# the Qwen3-30B-A3B shape (with the fused routing below) bf16 2.72 vs 2.47 ms. The lone last program's combine sits
# on the critical path, where the second launch spreads it over B * Hq programs and overlaps through PDL.
# Tried and removed: a minimum of context tokens per split (MIN_TILES; 128-512 tokens, so a short context runs in
# fewer splits and the combine exits): H200 7.1-8.1 / 8.4-17.1 us per layer at context 130 / 2000, against 5.06 /
# 8.25 with every split in use (benchmarks/h200/small_kernels.py, 2026-11-29).
def splits_for(batch: int, kv_heads: int, max_splits: int = 16, programs: int = 1024) -> int:
    """Context splits per (sequence, kv head): the fewest that give `programs` programs, at most max_splits. A power
    of two (the combine kernel's arange). Fixed per batch bucket (the graph is captured once), so it must serve short
    and long contexts alike; 1,024 does. H200 (benchmarks/h200/paged_sweep.py, paged-decode-h200.json), us per layer
    at context 160 / 1,024 / 4,096, the old rule (128 programs) -> this: batch 8 5.3 / 12.1 / 35.2 -> 7.7 / 10.4 /
    23.3; batch 64 12.5 / 51.7 / 193.5 -> 12.9 / 40.7 / 134.1 (HBM limit 5.0 / 31.8 / 127.2); batch 128 16.1 /
    74.9 / 283.5 -> 18.8 / 73.6 / 260.8; batch 1 unchanged (16 splits). One split of BLOCK_N 128 with 8 warps summed
    2-5% less over the three contexts at batch 64-128, but was 25% slower at batch 128, context 160."""
    s = 1
    while s < max_splits and batch * kv_heads * s < programs:
        s *= 2
    return s


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, kv_block: int, block_n: int = 64,
                           splits: int | None = None, num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """q [B, Hq, D]; pools [slots, Hkv, D] (fp8: V [blocks, Hkv, D, kv_block]); block_tables [B, W] int32; seq_lens
    [B] int32 (>= 1, the new token included, its K/V already written) -> [B, Hq, D] in q's dtype. splits: context
    splits (None: splits_for)."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    check_pools(k_pool, v_pool)
    if hq % hkv or d & (d - 1) or k_pool.stride(2) != 1 or v_pool.stride(-1) != 1 or q.stride(2) != 1:
        raise ValueError(f"paged decode needs Hq % Hkv == 0, a power-of-two head dim and contiguous heads, got "
                         f"q {tuple(q.shape)}, pools {tuple(k_pool.shape)}")
    group = hq // hkv
    out = torch.empty_like(q)
    (k_pool, fp8), (v_pool, _) = kv_bytes(k_pool), kv_bytes(v_pool)
    # fp8 pools: half the splits. H200, batch 64 / 128 at context 4,096 (paged_sweep.py --kv bf16,fp8): 94.5 / 189.4
    # us per layer (the best variants at these splits 94.5 / 183.7); the bf16 cache 134.7 / 260.9.
    splits = splits_for(b, hkv, programs=512 if fp8 else 1024) if splits is None else splits
    num_stages = 2 if num_stages is None else num_stages
    # Tried and dropped (H200, 2026-11-30): fp8 V loaded a tile ahead into registers (its loads are not cp.async, so
    # no stage prefetches them): the carried tile goes through shared memory to the dot layout, 153.6 / 287.9 us at
    # batch 64 / 128, context 4,096, against 96.4 / 189.7.
    part = torch.empty(b, hq, splits, d + 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_decode[(b, hkv, splits)](
        q, k_pool, v_pool, out, block_tables, seq_lens, part, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, KV_BLOCK=kv_block, BLOCK_N=block_n,
        SPLITS=splits, FP8_KV=fp8, num_warps=num_warps, num_stages=num_stages, **pdl.launch(),
    )
    if splits > 1:
        _combine_splits[(b, hq)](part, out, out.stride(0), out.stride(1), SPLITS=splits, HEAD_DIM=d, num_warps=1,
                                 **pdl.launch())
    return out
