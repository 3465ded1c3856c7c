"""LayeredBank: a shard's experts when they differ by layer (a per-layer placement file from `moemesh placement
--per-layer`): one ExpertBank per distinct expert set, each over the layers that host that set.

It has ExpertBank's surface for ExpertShard (layers, experts, weight_bytes, forward with out=): `experts` is the
union over the layers (what Info reports); forward sends a layer to its own bank, whose global -> local map ignores
the slots of experts that bank does not host (another shard computes them in that layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from moemesh.runtime.experts import ExpertBank


class LayeredBank:
    def __init__(self, banks: Mapping[int, ExpertBank]) -> None:
        self._banks = dict(banks)  # layer -> the bank hosting its experts (shared between layers of one set)
        self.layers = tuple(sorted(self._banks))
        self.experts = tuple(sorted({e for bank in self._banks.values() for e in bank.experts}))
        unique = {id(bank): bank for bank in self._banks.values()}.values()
        self.weight_bytes = sum(bank.weight_bytes for bank in unique)
        self.experts_by_layer = {layer: bank.experts for layer, bank in self._banks.items()}

    @classmethod
    def load(cls, model_dir: str | Path, by_layer: Mapping[int, list[int]], **kwargs) -> LayeredBank:
        """by_layer: MoE layer -> expert ids hosted in it; kwargs: ExpertBank.load's (device, dtype, spec, ...)."""
        sets: dict[tuple[int, ...], list[int]] = {}
        for layer, experts in sorted(by_layer.items()):
            sets.setdefault(tuple(sorted(experts)), []).append(layer)
        banks: dict[int, ExpertBank] = {}
        for experts, layers in sets.items():
            bank = ExpertBank.load(model_dir, experts=experts, layers=layers, **kwargs)
            banks.update({layer: bank for layer in layers})
        return cls(banks)

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """As ExpertBank.forward: hidden [T, H], topk_ids [T, K] global ids, topk_weights [T, K] -> [T, H]."""
        bank = self._banks.get(layer)
        if bank is None:
            raise KeyError(f"layer {layer} is not hosted here (hosted: {self.layers})")
        return bank.forward(layer, hidden, topk_ids, topk_weights, out=out)

    __call__ = forward
