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
norm/rope kernel's own saturating cast); every reader widens to the compute dtype.
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


def store(pool: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """pool[slots] = x as the cache holds it (pool [S, *E], slots [T] int64, x [T, *E])."""
    value = narrow(x, pool.dtype)
    if pool.dtype == FP8:  # no fp8 index_copy_ on the CPU (nor everywhere on CUDA): move the bytes
        pool.view(torch.uint8).index_copy_(0, slots, value.view(torch.uint8))
    else:
        pool.index_copy_(0, slots, value)


def gather(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pool[index] in the pool's dtype (index [N] int64)."""
    if pool.dtype == FP8:  # nor an fp8 index_select
        return pool.view(torch.uint8).index_select(0, index).view(FP8)
    return pool.index_select(0, index)


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, shapes: Shapes,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.num_blocks, self.block_size, self.shapes, self.dtype = num_blocks, block_size, shapes, dtype
        slots = num_blocks * block_size
        a, b = shapes
        self.pools = [
            (torch.zeros(slots, *a, device=device, dtype=dtype), torch.zeros(slots, *b, device=device, dtype=dtype))
            for _ in range(num_layers)
        ]  # per layer: ([slots, *A], [slots, *B])

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
