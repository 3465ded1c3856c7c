"""MLA decode attention over the paged latent cache (Triton), weight-absorbed (see runtime/mla_absorbed.py).

    q_lat [B, Hq, R], q_rot [B, Hq, r]; pools: latent [slots, R], rope key [slots, r]; block_tables [B, W] int32;
    seq_lens [B] int32 -> o_lat [B, Hq, R]       (DeepSeek-V2-Lite / V3: R = 512, r = 64; Hq = 16 / 128)

Every query head shares one latent and one rope key per token (MQA over R + r dims), so one program serves
BLOCK_H heads and reads each (latent, rope key) tile once for all of them: score = q_lat c^T + q_rot k_pe^T, the
value is the latent itself. The context is split over SPLITS programs per sequence (flash-decoding: a batch of 1
with 16 heads would otherwise keep one SM busy); each writes its normalised partial output and log-sum-exp, and a
second kernel merges the splits. SPLITS and every shape depend only on (B, Hq, W), and the loop bounds are read on
the device, so both launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_split(ql_ptr, qr_ptr, lat_ptr, rope_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr, scale, heads,
               stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_lat, stride_rope, stride_tb,
               R: tl.constexpr, RP: tl.constexpr, ROPE: tl.constexpr, ROPE_P: tl.constexpr, SPLITS: tl.constexpr,
               KV_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH] query heads of this program
    sp = tl.program_id(2)
    h_ok = hs < heads
    r = tl.arange(0, RP)
    e = tl.arange(0, ROPE_P)
    q_lat = tl.load(ql_ptr + b * stride_qlb + hs[:, None] * stride_qlh + r[None, :],
                    mask=h_ok[:, None] & (r[None, :] < R), other=0.0)  # [BH, RP]
    q_rot = tl.load(qr_ptr + b * stride_qrb + hs[:, None] * stride_qrh + e[None, :],
                    mask=h_ok[:, None] & (e[None, :] < ROPE), other=0.0)  # [BH, ROPE_P]
    seq_len = tl.load(lens_ptr + b)
    chunk = tl.cdiv(seq_len, SPLITS)
    start = sp * chunk
    end = tl.minimum(start + chunk, seq_len)  # this split's tokens [start, end); may be empty
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, RP), dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)  # [N]
        ok = pos < end
        block = tl.load(table_ptr + b * stride_tb + pos // KV_BLOCK, mask=ok, other=0)
        slot = block.to(tl.int64) * KV_BLOCK + pos % KV_BLOCK  # [N]
        c = tl.load(lat_ptr + slot[:, None] * stride_lat + r[None, :], mask=ok[:, None] & (r[None, :] < R),
                    other=0.0)  # [N, RP]
        k_pe = tl.load(rope_ptr + slot[:, None] * stride_rope + e[None, :], mask=ok[:, None] & (e[None, :] < ROPE),
                       other=0.0)  # [N, ROPE_P]
        s = (tl.dot(q_lat, tl.trans(c)) + tl.dot(q_rot, tl.trans(k_pe))) * scale  # [BH, N] float32
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has at least one valid token
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = (b * heads + hs).to(tl.int64) * SPLITS + sp  # [BH] row of (b, h, sp) in the partial buffers
    tl.store(o_ptr + row[:, None] * RP + r[None, :], out, mask=h_ok[:, None])
    tl.store(lse_ptr + row, lse, mask=h_ok)


@triton.jit
def _mla_merge(o_ptr, lse_ptr, out_ptr, heads, stride_ob, stride_oh, R: tl.constexpr, RP: tl.constexpr,
               SPLITS: tl.constexpr, SPLITS_P: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P)
    r = tl.arange(0, RP)
    row = (b * heads + h).to(tl.int64) * SPLITS + sp  # [S]
    lse = tl.load(lse_ptr + row, mask=sp < SPLITS, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # split 0 always holds tokens (seq_len >= 1): the max is finite
    part = tl.load(o_ptr + row[:, None] * RP + r[None, :], mask=sp[:, None] < SPLITS, other=0.0)  # [S, RP]
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + r, out.to(out_ptr.dtype.element_ty), mask=r < R)


def num_splits(batch: int, head_blocks: int, max_tokens: int, sms: int = 132) -> int:
    """Context splits per sequence: enough programs for ~2 waves of the SMs, each split >= 64 tokens of reach.
    Depends on shapes only (fixed per decode bucket)."""
    want = -(-2 * sms // (batch * head_blocks))
    return max(1, min(want, 32, max_tokens // 64))


def mla_decode_attention(q_lat: torch.Tensor, q_rot: torch.Tensor, latent_pool: torch.Tensor,
                         rope_pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         kv_block: int, block_h: int = 16, block_n: int = 32,
                         splits: int | None = None) -> torch.Tensor:
    """q_lat [B, Hq, R], q_rot [B, Hq, r] (last dims contiguous); pools [slots, R], [slots, r] contiguous;
    block_tables [B, W] int32; seq_lens [B] int32 (>= 1, new entries written) -> o_lat [B, Hq, R] in q_lat's dtype."""
    b, heads, rank = q_lat.shape
    rope = q_rot.shape[-1]
    q_rot = q_rot if q_rot.stride(-1) == 1 else q_rot.contiguous()
    if q_lat.stride(-1) != 1 or latent_pool.stride(-1) != 1 or rope_pool.stride(-1) != 1:
        raise ValueError(f"MLA decode needs contiguous last dims, got q_lat strides {q_lat.stride()}, pools "
                         f"{latent_pool.stride()} / {rope_pool.stride()}")
    rp, rope_p = max(16, triton.next_power_of_2(rank)), max(16, triton.next_power_of_2(rope))
    head_blocks = triton.cdiv(heads, block_h)
    if splits is None:
        sms = torch.cuda.get_device_properties(q_lat.device).multi_processor_count if q_lat.is_cuda else 4
        splits = num_splits(b, head_blocks, block_tables.shape[1] * kv_block, sms)
    parts = torch.empty(b * heads * splits, rp, device=q_lat.device, dtype=torch.float32)  # [B*Hq*S, RP]
    lse = torch.empty(b * heads * splits, device=q_lat.device, dtype=torch.float32)
    _mla_split[(b, head_blocks, splits)](
        q_lat, q_rot, latent_pool, rope_pool, block_tables, seq_lens, parts, lse, scale, heads,
        q_lat.stride(0), q_lat.stride(1), q_rot.stride(0), q_rot.stride(1), latent_pool.stride(0),
        rope_pool.stride(0), block_tables.stride(0),
        R=rank, RP=rp, ROPE=rope, ROPE_P=rope_p, SPLITS=splits, KV_BLOCK=kv_block, BLOCK_H=block_h,
        BLOCK_N=block_n, num_warps=4, num_stages=2,
    )
    out = torch.empty(b, heads, rank, device=q_lat.device, dtype=q_lat.dtype)
    _mla_merge[(b, heads)](parts, lse, out, heads, out.stride(0), out.stride(1), R=rank, RP=rp, SPLITS=splits,
                           SPLITS_P=triton.next_power_of_2(splits), num_warps=4)
    return out
