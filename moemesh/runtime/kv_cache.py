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
"""

from __future__ import annotations

import math

import torch


Shapes = tuple[tuple[int, ...], tuple[int, ...]]  # per-token entry shapes of a layer's two pools


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
