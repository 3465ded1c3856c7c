"""ExpertBank.forward: the dense-routing fast path (every token selects every hosted expert) computes the same
weighted sum as the per-expert path, and is only taken when the routing really is dense over the bank."""

from __future__ import annotations

import torch

from moemesh.builtin.tiny import make_tiny_model
from moemesh.runtime.experts import ExpertBank


def _reference(bank: ExpertBank, layer: int, hidden, ids, weights) -> torch.Tensor:
    """sum_k w[t, k] * expert_{ids[t, k]}(hidden[t]) over hosted experts, one token and expert at a time."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            if e < 0 or e not in bank.experts:
                continue
            row = bank.experts.index(e)
            gate, up = (hidden[t] @ bank.gate_up[layer][row].T).chunk(2)
            out[t] += w * ((bank.act(gate) * up) @ bank.down[layer][row].T)
    return out


def test_all_selected_fast_path_equals_the_per_expert_sum(tmp_path):
    path = make_tiny_model(tmp_path / "tiny", num_experts=4, top_k=4, hidden=64, layers=2, seed=3)
    torch.manual_seed(0)
    hidden = torch.randn(5, 64)
    ids = torch.stack([torch.randperm(4) for _ in range(5)])  # [T, K]: every expert, in any slot order
    weights = torch.softmax(torch.randn(5, 4), dim=-1)
    for experts in ((0, 1, 2, 3), (1, 3)):  # the whole model, or one shard of it (dense over the shard)
        bank = ExpertBank.load(path, experts=experts)
        got = bank.forward(1, hidden, ids, weights)
        assert 1 in bank._concat, "dense routing over the bank takes the concatenated path"
        torch.testing.assert_close(got, _reference(bank, 1, hidden, ids, weights), atol=1e-5, rtol=1e-5)


def test_sparse_routing_does_not_take_the_fast_path(tmp_path):
    path = make_tiny_model(tmp_path / "tiny", num_experts=4, top_k=2, hidden=64, layers=2, seed=3)
    bank = ExpertBank.load(path)
    hidden = torch.randn(3, 64)
    ids = torch.tensor([[0, 1], [2, 3], [1, -1]])
    weights = torch.rand(3, 2)
    got = bank.forward(0, hidden, ids, weights)
    assert not bank._concat
    torch.testing.assert_close(got, _reference(bank, 0, hidden, ids, weights), atol=1e-5, rtol=1e-5)


def test_out_receives_the_result_on_both_paths_with_int32_ids(tmp_path):
    """The shared-memory shard passes its output rows as out= and int32 ids straight from the region."""
    path = make_tiny_model(tmp_path / "tiny", num_experts=4, top_k=4, hidden=64, layers=2, seed=3)
    bank = ExpertBank.load(path, experts=(1, 3))
    torch.manual_seed(1)
    hidden = torch.randn(3, 64)
    weights = torch.softmax(torch.randn(3, 4), dim=-1)
    dense = torch.stack([torch.randperm(4) for _ in range(3)]).to(torch.int32)  # every hosted expert selected
    sparse = torch.tensor([[0, 1, -1, -1], [2, 3, 1, -1], [0, 2, -1, -1]], dtype=torch.int32)  # row 2: none hosted
    for ids in (dense, sparse):
        out = torch.full((3, 64), float("nan"))
        got = bank.forward(1, hidden, ids, weights, out=out)
        assert got is out
        torch.testing.assert_close(out, _reference(bank, 1, hidden, ids, weights),
                                   atol=1e-5, rtol=1e-5)
