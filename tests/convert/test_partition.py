"""Neuron partitions and router calibration on synthetic activations with a known block structure."""

from __future__ import annotations

import pytest
import torch

from moemesh.convert.partition import balanced_assign, check_partition, partition_layer
from moemesh.convert.router_fit import expert_scores, fit_router
from moemesh.convert.checkpoint import LayerPartition


def blocky_activations(tokens: int = 512, neurons: int = 64, groups: int = 4, seed: int = 0) -> tuple:
    """Neurons of group g fire only on tokens of topic g; the topic shows in the FFN input's first `groups` dims."""
    gen = torch.Generator().manual_seed(seed)
    topic = torch.randint(0, groups, (tokens,), generator=gen)
    group_of = torch.randperm(neurons, generator=gen) % groups  # scattered: contiguous blocks would be wrong
    act = torch.rand(tokens, neurons, generator=gen) * 0.01
    act += (topic[:, None] == group_of[None, :]).float() * (1 + torch.rand(tokens, neurons, generator=gen))
    x = torch.randn(tokens, 16, generator=gen) * 0.1
    x[torch.arange(tokens), topic] += 3.0
    return act, x, group_of, topic


@pytest.mark.parametrize("method", ["coactivation", "kmeans", "contiguous"])
@pytest.mark.parametrize("shared", [0, 8])
def test_every_method_covers_each_neuron_once(method: str, shared: int) -> None:
    act, _, _, _ = blocky_activations()
    gen = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(64, 16), torch.randn(64, 16), torch.randn(16, 64)
    part = partition_layer(method, 4, shared, act, gate, up, down, gen)
    assert part.shared.numel() == shared and part.experts.shape == (4, (64 - shared) // 4)
    check_partition(part, 64)


def test_coactivation_recovers_the_neuron_groups_and_the_router_finds_them() -> None:
    act, x, group_of, topic = blocky_activations()
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(16, 64)
    part = partition_layer("coactivation", 4, 0, act, torch.randn(64, 16), torch.randn(64, 16), down, gen)
    for expert in part.experts:  # each expert holds exactly one group
        assert group_of[expert].unique().numel() == 1
    fit = fit_router(x, expert_scores(act, down, part), top_k=1, steps=200, seed=0)
    assert fit.hit_rate > 0.95
    chosen = (x @ fit.weight.T).argmax(-1)
    expert_group = torch.stack([group_of[e][0] for e in part.experts])
    assert (expert_group[chosen] == topic).float().mean() > 0.95


def test_shared_expert_takes_the_most_active_neurons() -> None:
    act = torch.rand(100, 32) * 0.1
    act[:, [3, 17, 30]] += 5.0
    part = partition_layer("contiguous", 29, 3, act, torch.randn(32, 8), torch.randn(32, 8), torch.ones(8, 32),
                           torch.Generator().manual_seed(0))
    assert part.shared.tolist() == [3, 17, 30]


def test_balanced_assign_fills_every_cluster_exactly() -> None:
    sim = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    sim[:, 0] += 10  # everybody prefers cluster 0; only 8 may join it
    labels = balanced_assign(sim, 8)
    assert torch.bincount(labels, minlength=5).tolist() == [8] * 5
    assert set(torch.nonzero(labels == 0).flatten().tolist()) == set(torch.topk(sim[:, 0], 8).indices.tolist())
    with pytest.raises(ValueError, match="do not fill"):
        balanced_assign(sim, 7)


def test_check_partition_rejects_a_duplicate() -> None:
    bad = LayerPartition(shared=torch.tensor([0]), experts=torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(AssertionError, match="exactly once"):
        check_partition(bad, 5)
