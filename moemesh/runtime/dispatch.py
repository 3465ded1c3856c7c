"""In-process ExpertDispatch implementations (types.ExpertDispatch): the router's gRPC fan-out is the remote one."""

from __future__ import annotations

import torch

from moemesh.runtime.experts import ExpertBank


class LocalDispatch:
    """Runs the routed experts in process on one ExpertBank (which must host every expert and MoE layer)."""

    def __init__(self, bank: ExpertBank) -> None:
        self.bank = bank

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        return self.bank.forward(layer, hidden, topk_ids, topk_weights).to(hidden.device)


class SumDispatch:
    """Sums the partial outputs of several dispatches that each host part of the experts (shards in process)."""

    def __init__(self, parts: list) -> None:
        if not parts:
            raise ValueError("SumDispatch needs at least one part")
        self.parts = list(parts)

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for part in self.parts:
            total += part(layer, hidden, topk_ids, topk_weights).to(hidden.device, torch.float32)
        return total.to(hidden.dtype)
