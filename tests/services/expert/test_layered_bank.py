"""LayeredBank (a shard's experts differ by layer): each layer computes exactly its own experts, as the full bank
does with the other experts' slots unused."""

from __future__ import annotations

import torch

from moemesh.runtime.experts import ExpertBank
from services.expert.layered_bank import LayeredBank


def test_each_layer_computes_only_its_own_experts(tiny_moe_dir):
    by_layer = {0: [0, 1, 2], 1: [1, 3]}
    bank = LayeredBank.load(tiny_moe_dir, by_layer)
    full = ExpertBank.load(tiny_moe_dir)
    assert bank.layers == (0, 1) and bank.experts == (0, 1, 2, 3)
    torch.manual_seed(0)
    hidden, ids, weights = torch.randn(5, 64), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    for layer, experts in by_layer.items():
        mine = torch.isin(ids, torch.tensor(experts))
        want = full.forward(layer, hidden, torch.where(mine, ids, -1), torch.where(mine, weights, 0.0))
        torch.testing.assert_close(bank.forward(layer, hidden, ids, weights), want)
        assert not torch.allclose(want, full.forward(layer, hidden, ids, weights))  # the mask mattered
    out = torch.empty(5, 64)
    assert bank.forward(1, hidden, ids, weights, out=out) is out
    shared = LayeredBank.load(tiny_moe_dir, {0: [0, 1], 1: [0, 1]})  # one set: one bank for both layers
    assert shared.weight_bytes == ExpertBank.load(tiny_moe_dir, experts=[0, 1]).weight_bytes
