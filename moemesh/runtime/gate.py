"""The per-layer expert gate: hidden [T, H] -> (topk_ids [T, K] int64, topk_weights [T, K] float32).

Scoring follows each family (see MoeSpec): softmax over all experts (Mixtral, Qwen, OLMoE, DeepSeek V2), sigmoid with
a selection-only correction bias (DeepSeek V3), or moemesh "unit" (top-k logits, weight 1.0 each). Group-limited
routing (DeepSeek) first keeps the topk_group best of n_group expert groups. Gate logits are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.runtime.expert_load import count
from moemesh.runtime.layers import Loader
from moemesh.runtime.spec import MoeSpec


class Gate(nn.Module):
    def __init__(self, spec: MoeSpec, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(weight.float(), requires_grad=False)  # [E, H] float32
        self.correction_bias = bias.float() if bias is not None else None  # [E] (V3), selection only
        self.fast = False  # CUDA: softmax + top-k + renormalisation in one Triton kernel (set_fast)

    def set_fast(self, on: bool) -> None:
        s = self.spec
        self.fast = on and s.scoring == "softmax" and s.n_group == 1 and self.correction_bias is None

    @classmethod
    def load(cls, ld: Loader, prefix: str, spec: MoeSpec) -> Gate:
        weight = ld.tensor(f"{prefix}.weight", torch.float32)
        bias = ld.tensor(f"{prefix}.e_score_correction_bias", torch.float32) if spec.correction_bias else None
        if weight.shape[0] != spec.num_experts:
            raise ValueError(f"{prefix}.weight has {weight.shape[0]} rows, config says {spec.num_experts} experts")
        return cls(spec, weight, bias)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None = None,
                logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (ids [T, K] int64, weights [T, K] float32). counts [E] int64: each chosen expert's routed-token
        counter goes up by one, on the device (expert_load.py; in the top-k launch itself on the fast path).
        logits [T, E] float32: x.float() @ weight^T already computed (the backbone's fast path folds it into the
        post-attention norm's launch, fused_ops.router_logits_norm)."""
        s = self.spec
        if self.fast:  # CUDA: two launches (float32 logits, then softmax + top-k) instead of ~6
            from moemesh.runtime.gpu import router_gemm
            from moemesh.runtime.gpu.fused_ops import route_softmax

            logits = router_gemm.logits(x, self.weight) if logits is None else logits  # or [S, T, E] partials
            return route_softmax(logits, s.top_k, s.norm_topk_prob, s.routed_scaling_factor, counts)
        ids, weights = self._route(x, logits)
        if counts is not None:
            count(counts, ids)
        return ids, weights

    def _route(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        logits = F.linear(x.float(), self.weight) if logits is None else logits  # [T, E]
        if s.scoring == "unit":
            ids = logits.topk(s.top_k, dim=-1).indices
            return ids, torch.ones(ids.shape, dtype=torch.float32, device=x.device)
        scores = logits.softmax(dim=-1) if s.scoring == "softmax" else logits.sigmoid()  # [T, E]
        choice = scores if self.correction_bias is None else scores + self.correction_bias
        if s.n_group > 1:
            choice = self._limit_groups(choice)
        ids = choice.topk(s.top_k, dim=-1).indices  # [T, K]
        weights = scores.gather(1, ids)  # [T, K]
        if s.norm_topk_prob:
            denominator = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denominator + 1e-20 if s.scoring == "sigmoid" else denominator)
        return ids, weights * s.routed_scaling_factor

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only the experts of each token's topk_group best groups (others: -inf, or 0 for V2's "max")."""
        s = self.spec
        grouped = choice.view(choice.shape[0], s.n_group, -1)  # [T, G, E/G]
        if s.group_score == "top2":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        best = group_scores.topk(s.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
        keep = keep[:, :, None].expand_as(grouped).reshape(choice.shape)  # [T, E]
        fill = float("-inf") if s.group_score == "top2" else 0.0
        return choice.masked_fill(~keep, fill)
