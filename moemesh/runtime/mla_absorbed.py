"""MLA decode with weight absorption (DeepSeek-V2 paper, section 2.1.2; vLLM/SGLang's MLA backends): attention
straight over the cached latent, nothing expanded per head.

kv_b_proj's weight [Hq * (nope + v), R] is, per head h, W_UK[h] [nope, R] stacked on W_UV[h] [v, R]. The expanded
path computes k_nope[j, h] = W_UK[h] c[j] and v[j, h] = W_UV[h] c[j] for every cached token j, every layer. Since
    q_nope . k_nope[j] = (W_UK[h]^T q_nope) . c[j]       and       sum_j p_j v[j, h] = W_UV[h] (sum_j p_j c[j])
decode folds W_UK into the query and W_UV into the output instead:

    q_nope [B, Hq, nope] --W_UK--> q_lat [B, Hq, R]          scores_j = (q_lat . c[j] + q_rot . k_pe[j]) * scale
    o_lat = softmax(scores) @ c  [B, Hq, R]  --W_UV--> [B, Hq, v] -> o_proj

Per step that reads the context once as (R + r) values per token (DeepSeek-V2-Lite: 512 + 64) instead of
multiplying the whole context by kv_b_proj. The context is read from the paged pools through the block tables:
the Triton kernel on CUDA (gpu/mla_decode.py), a fixed-shape torch gather + softmax elsewhere (the reference here).
Every shape is fixed by (B, table width) and nothing reads a value on the host, so the step can be graph-captured.
"""

from __future__ import annotations

import torch


def absorbed_weights(kv_b_weight: torch.Tensor, heads: int, nope: int,
                     vdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight [Hq * (nope + v), R] -> (W_UK [Hq, nope, R], W_UV [Hq, v, R]), views (no copy)."""
    w = kv_b_weight.view(heads, nope + vdim, kv_b_weight.shape[-1])
    return w[:, :nope], w[:, nope:]


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [B, Hq, nope] x W_UK [Hq, nope, R] -> q_lat [B, Hq, R] (one batched GEMM over the heads)."""
    return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)


def expand_output(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_lat [B, Hq, R] x W_UV [Hq, v, R] -> [B, Hq * v] (the input of o_proj)."""
    out = torch.bmm(o_lat.transpose(0, 1).to(w_uv.dtype), w_uv.transpose(1, 2))  # [Hq, B, v]
    return out.transpose(0, 1).reshape(o_lat.shape[0], -1)


def paged_latent_attention_ref(q_lat: torch.Tensor, q_rot: torch.Tensor, latent_pool: torch.Tensor,
                               rope_pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, kv_block: int) -> torch.Tensor:
    """Torch reference of the paged latent attention (float32 inside).

    q_lat [B, Hq, R], q_rot [B, Hq, r]; pools [slots, R], [slots, r]; block_tables [B, W] int; seq_lens [B] int
    (>= 1, the new token's entry already written) -> o_lat [B, Hq, R] in q_lat's dtype. Gathers W * kv_block
    positions per sequence (the table's whole reach, masked beyond seq_len): fixed shapes, no host sync."""
    b, w = block_tables.shape
    j = torch.arange(w * kv_block, device=block_tables.device)  # [L]
    slots = block_tables.long()[:, j // kv_block] * kv_block + j % kv_block  # [B, L]
    lat = latent_pool.index_select(0, slots.reshape(-1)).view(b, -1, latent_pool.shape[-1]).float()  # [B, L, R]
    rot = rope_pool.index_select(0, slots.reshape(-1)).view(b, -1, rope_pool.shape[-1]).float()  # [B, L, r]
    scores = torch.bmm(q_lat.float(), lat.transpose(1, 2)) + torch.bmm(q_rot.float(), rot.transpose(1, 2))
    scores = (scores * scale).masked_fill(j[None, None, :] >= seq_lens.long()[:, None, None], float("-inf"))
    return torch.bmm(torch.softmax(scores, -1), lat).to(q_lat.dtype)  # [B, Hq, R]


def paged_latent_attention(q_lat: torch.Tensor, q_rot: torch.Tensor, latent_pool: torch.Tensor,
                           rope_pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, kv_block: int) -> torch.Tensor:
    """The Triton kernel on CUDA, the torch reference elsewhere; same arguments as paged_latent_attention_ref."""
    if latent_pool.is_cuda:
        from moemesh.runtime.gpu.mla_decode import mla_decode_attention

        return mla_decode_attention(q_lat, q_rot, latent_pool, rope_pool, block_tables, seq_lens, scale, kv_block)
    return paged_latent_attention_ref(q_lat, q_rot, latent_pool, rope_pool, block_tables, seq_lens, scale, kv_block)


def absorbed_decode(q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                    kv_b_weight: torch.Tensor, vdim: int, ctx, pools: tuple[torch.Tensor, torch.Tensor],
                    scale: float) -> torch.Tensor:
    """One decode token per sequence: q_nope [B, Hq, nope], q_rot [B, Hq, r] (rotated), this step's latent [B, R]
    and rotated rope key [B, r] -> o_proj input [B, Hq * v]. ctx is a gpu/decode_graphs.DecodeContext (slots,
    block_tables, seq_lens, kv_block); the new entries are written into the layer's pools first."""
    latent_pool, rope_pool = pools
    latent_pool.index_copy_(0, ctx.slots, latent.to(latent_pool.dtype))
    rope_pool.index_copy_(0, ctx.slots, k_rot.to(rope_pool.dtype))
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    w_uk, w_uv = absorbed_weights(kv_b_weight, heads, nope, vdim)
    q_lat = absorb_query(q_nope, w_uk)  # [B, Hq, R]
    o_lat = paged_latent_attention(q_lat, q_rot.to(q_lat.dtype), latent_pool, rope_pool, ctx.block_tables,
                                   ctx.seq_lens, scale, ctx.kv_block)
    return expand_output(o_lat, w_uv)
