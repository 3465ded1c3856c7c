"""Tokens routed to each (MoE layer, expert), counted on the device: the load signal for balancing and placement.

MoeBlock hands its gate the layer's row of a [L, E] int64 tensor on the model's device; the gate adds its choices
there (`count`; on CUDA inside the top-k launch itself, gpu/fused_ops.route_softmax): no host synchronization,
nothing that breaks CUDA graph capture, no launch of its own. The host sees the counts only when someone asks (`snapshot`, one device->host copy), e.g.
when Prometheus scrapes or Router.Info is called; run it on the thread that steps the engine (the router's engine
worker) so it never lands inside a step being captured.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertLoad:
    def __init__(self, num_layers: int, num_experts: int, moe_layers: tuple[int, ...],
                 device: torch.device | str) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1 for expert load counters, got {num_experts}")
        self.num_experts, self.moe_layers = num_experts, tuple(moe_layers)
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]

    @classmethod
    def attach(cls, backbone: nn.Module) -> ExpertLoad | None:
        """The counters of this backbone's MoE blocks, created and hooked on first call (None for a dense model)."""
        from moemesh.runtime.backbone import MoeBlock  # here: backbone.py imports this module for its annotation

        blocks = [m for m in backbone.modules() if isinstance(m, MoeBlock)]
        if not blocks:
            return None
        if blocks[0].expert_load is not None:
            return blocks[0].expert_load
        spec = backbone.spec
        load = cls(spec.num_layers, spec.num_experts, spec.moe_layers, backbone.embed.device)
        for block in blocks:
            block.expert_load = load
        return load

    def snapshot(self) -> dict[int, list[int]]:
        """{MoE layer: tokens per expert id} since start (one device->host copy)."""
        host = self.counts.cpu().tolist()
        return {layer: host[layer] for layer in self.moe_layers}


def count(counts: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """counts [E] int64 += one per routed slot of topk_ids [T, K] int64 (-1: an unused slot, not counted)."""
    ids = topk_ids.reshape(-1)  # [T*K]
    counts.index_add_(0, ids.clamp(min=0), (ids >= 0).to(torch.int64))
