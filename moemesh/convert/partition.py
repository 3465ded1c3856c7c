"""Split one FFN's neurons into an always-on shared expert and equal-size routed experts.

Methods (FACTS.md: co-activation k-means gives the best router hit rate):
- coactivation: balanced spherical k-means of each neuron's |activation| profile over the calibration tokens, so
  neurons that fire on the same tokens share an expert;
- kmeans: balanced spherical k-means of each neuron's concatenated gate and up weight rows;
- contiguous: neurons in their original order.
The shared expert takes the most active neurons: mean |silu(gate) * up| times the norm of the neuron's down column.
"""

from __future__ import annotations

import torch

from moemesh.convert.checkpoint import LayerPartition

KMEANS_ITERS = 25


def neuron_importance(act: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """[F]: how much each neuron adds to the FFN output on average (act [T, F], down [H, F])."""
    return act.abs().float().mean(0) * down.float().norm(dim=0)


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Labels [n] in 0..E-1 with exactly `capacity` members each, greedily by similarity sim [n, E].

    Each round, every unassigned point bids for its best cluster with room left; an over-bid cluster keeps its most
    similar bidders and is then full. At most E rounds.
    """
    n, clusters = sim.shape
    if n != clusters * capacity:
        raise ValueError(f"{n} points do not fill {clusters} clusters of {capacity}")
    labels = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    room = [capacity] * clusters  # host-side: no device sync per check
    while bool((labels < 0).any()):
        free = labels < 0
        full = torch.tensor([r == 0 for r in room], device=sim.device)
        best = sim.masked_fill(full.unsqueeze(0), float("-inf")).argmax(dim=1)
        for e in range(clusters):
            bidders = torch.nonzero(free & (best == e)).flatten()
            if bidders.numel() == 0:
                continue
            take = min(room[e], bidders.numel())
            chosen = bidders[torch.topk(sim[bidders, e], take, sorted=True).indices]
            labels[chosen] = e
            room[e] -= take
    return labels


def balanced_kmeans(features: torch.Tensor, clusters: int, gen: torch.Generator) -> torch.Tensor:
    """Labels [n] of equal-size spherical k-means on features [n, d] (k-means++ seeding, seeded)."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    n = x.shape[0]
    centers = [int(torch.randint(0, n, (1,), generator=gen))]
    for _ in range(clusters - 1):
        dist = (1 - x @ x[centers].T).clamp_min(0).min(dim=1).values.double().cpu()  # cosine distance to nearest centre
        probs = dist / dist.sum() if float(dist.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        centers.append(int(torch.multinomial(probs, 1, generator=gen)))
    centroids = x[centers]
    labels = balanced_assign(x @ centroids.T, n // clusters)
    for _ in range(KMEANS_ITERS):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
        new = balanced_assign(x @ centroids.T, n // clusters)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def partition_layer(method: str, experts: int, shared: int, act: torch.Tensor, gate: torch.Tensor,
                    up: torch.Tensor, down: torch.Tensor, gen: torch.Generator) -> LayerPartition:
    """Partition of one FFN (act [T, F] calibration activations, gate/up [F, H], down [H, F])."""
    total = gate.shape[0]
    order = torch.argsort(neuron_importance(act, down), descending=True, stable=True).cpu()
    shared_idx = torch.sort(order[:shared]).values
    routed = torch.sort(order[shared:]).values  # [F - S] ascending neuron ids
    if method == "contiguous":
        labels = torch.arange(routed.numel()) // (routed.numel() // experts)
    elif method == "coactivation":
        labels = balanced_kmeans(act[:, routed.to(act.device)].abs().T, experts, gen).cpu()
    elif method == "kmeans":
        cols = routed.to(gate.device)
        labels = balanced_kmeans(torch.cat([gate[cols], up[cols]], dim=1), experts, gen).cpu()
    else:
        raise ValueError(f"cluster={method!r}")
    groups = [routed[labels == e] for e in range(experts)]  # ascending within each expert
    part = LayerPartition(shared=shared_idx, experts=torch.stack(groups))
    check_partition(part, total)
    return part


def check_partition(part: LayerPartition, total: int) -> None:
    """Every neuron 0..total-1 exactly once across the shared and routed experts."""
    every = torch.cat([part.shared, part.experts.flatten()])
    if every.numel() != total or not torch.equal(torch.sort(every).values, torch.arange(total)):
        raise AssertionError(f"partition does not cover the {total} neurons exactly once")
