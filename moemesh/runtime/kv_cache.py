"""Paged KV cache: per layer two preallocated pools of num_blocks * block_size token slots; BlockManager decides
which slots belong to which sequence. Pools are zero-filled (masked-out slots must hold finite values: SDPA adds
the mask to q.k, and a NaN there would survive it).

What a slot holds, and the memory it costs (dtype bytes b, L layers):
  - grouped-query attention: rotated K [Hkv, D] and V [Hkv, D]
        bytes per token = L * 2 * Hkv * D * b
        SmolLM2-135M float32: 30 * 2 * 3 * 64 * 4 = 46,080 B (45 KiB); Mixtral-8x7B bf16: 32 * 2 * 8 * 128 * 2 = 128 KiB
  - DeepSeek MLA: the compressed latent [kv_lora_rank] and the rotated shared rope key [qk_rope_head_dim]
        bytes per token = L * (kv_lora_rank + qk_rope_head_dim) * b
        DeepSeek-V3 bf16: 61 * (512 + 64) * 2 = 70,272 B (the expanded per-head K/V would be 71x more)
A block costs block_size times that; capacity is a block count, or the blocks a memory budget buys.

kv_cache_dtype "fp8" (grouped-query attention only) keeps the pools in e4m3 (b = 1): twice the tokens per byte and
half the bytes a decode step reads (on the H200 paged decode is HBM-bound: 134 us a layer at batch 64, context
4,096, against 127 us of bytes). As vLLM's and SGLang's fp8 KV cache without calibration, the scale is 1: a value is
stored as the nearest e4m3 (3 mantissa bits, relative error <= 2^-4 from 2^-6 up), saturated at +-448 (K after the
qk-norm / rope and V sit far below it in the supported families). Every write goes through `store` (and the decode
norm/rope kernel's own saturating cast); every reader widens to the compute dtype. The fp8 V pool keeps each block's
tokens innermost, [blocks, Hkv, D, block_size] (vLLM's V layout): attention reduces P @ V over tokens, so the tensor
cores want a value's neighbours along tokens, which this layout gives as contiguous bytes (in [slots, Hkv, D] each byte
would be read alone, or the tile staged once more through shared memory). H200, batch 64 / 128 at context 4,096, us
per layer: bf16 cache 134.7 / 260.9, fp8 [slots, Hkv, D] 116.6 / 223.3, fp8 token-minor V 94.5 / 189.4
(benchmarks/results/paged-decode-h200-fp8.md).
"""

from __future__ import annotations

import math

import torch


Shapes = tuple[tuple[int, ...], tuple[int, ...]]  # per-token entry shapes of a layer's two pools
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value; stores saturate there (a plain cast would give NaN)


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' dtype for Engine.load's kv_cache_dtype."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return FP8 if kv_cache_dtype == "fp8" else model_dtype


def narrow(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache holds it: cast to dtype, saturated at +-FP8_MAX when dtype is fp8."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(dtype) if dtype == FP8 else x.to(dtype)


def token_minor(pool: torch.Tensor) -> int:
    """The block size of a pool that keeps each block's tokens innermost ([blocks, *E, block_size]), else 0."""
    return pool.shape[-1] if pool.dtype == FP8 and pool.dim() == 4 else 0


def to_token_minor(pool: torch.Tensor, block_size: int) -> torch.Tensor:
    """[slots, *E] -> [slots / block_size, *E, block_size] (a copy): the fp8 V pool's layout."""
    return pool.view(-1, block_size, *pool.shape[1:]).movedim(1, -1).contiguous()


def store(pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Slots `slots` of the pool = x as the cache holds it (pool [S, *E] or token-minor [S / bs, *E, bs], slots [T]
    int64, x [T, *E])."""
    value = narrow(x, pool.dtype)
    bs = token_minor(pool)
    if bs:  # (fp8 has no index_copy_ on the CPU, nor everywhere on CUDA: the bytes move)
        pool.view(torch.uint8)[slots // bs, ..., slots % bs] = value.view(torch.uint8)
    elif pool.dtype == FP8:
        pool.view(torch.uint8).index_copy_(0, slots, value.view(torch.uint8))
    else:
        pool.index_copy_(0, slots, value)


def gather(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Slots `index` [N] int64 of the pool in its dtype: [N, *E]."""
    bs = token_minor(pool)
    if bs:
        return pool.view(torch.uint8)[index // bs, ..., index % bs].view(FP8)
    if pool.dtype == FP8:  # nor an fp8 index_select
        return pool.view(torch.uint8).index_select(0, index).view(FP8)
    return pool.index_select(0, index)


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, shapes: Shapes,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.num_blocks, self.block_size, self.shapes, self.dtype = num_blocks, block_size, shapes, dtype
        slots = num_blocks * block_size
        a, b = shapes
        b_pool = (num_blocks, *b, block_size) if dtype == FP8 else (slots, *b)  # fp8 V: tokens innermost
        self.pools = [
            (torch.zeros(slots, *a, device=device, dtype=dtype), torch.zeros(b_pool, device=device, dtype=dtype))
            for _ in range(num_layers)
        ]  # per layer: ([slots, *A], [slots, *B]; fp8: [blocks, *B, block_size])

    @staticmethod
    def bytes_per_token(num_layers: int, shapes: Shapes, dtype: torch.dtype) -> int:
        per_layer = sum(math.prod(s) for s in shapes)
        return num_layers * per_layer * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def blocks_for_budget(cls, budget_bytes: int, block_size: int, num_layers: int, shapes: Shapes,
                          dtype: torch.dtype) -> int:
        """How many blocks fit in budget_bytes (at least 1)."""
        return max(1, budget_bytes // (block_size * cls.bytes_per_token(num_layers, shapes, dtype)))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.pools)
