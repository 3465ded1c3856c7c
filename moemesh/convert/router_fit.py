"""Router calibration: a linear router per layer trained to pick each token's best experts.

A token's best experts are those whose output (its neurons' share of the dense FFN output) has the largest norm on
that token. The router [E, H] is fitted on the calibration tokens' FFN inputs with binary cross-entropy on top-k
membership (k = top_k, or E/2 when every expert runs anyway), full-batch Adam; 10% of the tokens are held out to
report the hit rate (share of the true top-k the router picks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.convert.checkpoint import LayerPartition

HOLDOUT = 0.1
LR = 1e-2


@dataclass(frozen=True)
class RouterFit:
    weight: torch.Tensor  # [E, H] float32
    hit_rate: float  # held-out share of the true top-k experts the router picks


def expert_scores(act: torch.Tensor, down: torch.Tensor, part: LayerPartition) -> torch.Tensor:
    """[T, E]: norm of each routed expert's output per token (act [T, F], down [H, F])."""
    act, down = act.float(), down.float()
    cols = [(act[:, idx] @ down[:, idx].T).norm(dim=-1) for idx in part.experts.to(act.device)]
    return torch.stack(cols, dim=1)


def label_k(experts: int, top_k: int) -> int:
    return top_k if top_k < experts else max(1, experts // 2)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter(-1, torch.topk(scores, k, dim=-1).indices, 1.0)


def hit_rate(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Mean share of the target's k experts among the logits' top-k."""
    return float((topk_mask(logits, k) * target).sum(-1).mean() / k)


def fit_router(x: torch.Tensor, scores: torch.Tensor, top_k: int, steps: int, seed: int) -> RouterFit:
    """Router [E, H] from FFN inputs x [T, H] and expert scores [T, E]."""
    experts = scores.shape[1]
    k = label_k(experts, top_k)
    x = x.float()
    target = topk_mask(scores.float(), k)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    n_hold = max(1, int(x.shape[0] * HOLDOUT)) if x.shape[0] > 10 else 0
    x_hold, t_hold, x_train, t_train = x[perm[:n_hold]], target[perm[:n_hold]], x[perm[n_hold:]], target[perm[n_hold:]]
    weight = torch.zeros(experts, x.shape[1], device=x.device, requires_grad=True)
    opt = torch.optim.Adam([weight], lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x_train @ weight.T, t_train)
        loss.backward()
        opt.step()
    weight = weight.detach().cpu()
    rate = hit_rate(x_hold.cpu() @ weight.T, t_hold.cpu(), k) if n_hold else float("nan")
    return RouterFit(weight=weight, hit_rate=rate)
