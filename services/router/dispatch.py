"""RemoteDispatch: the ExpertDispatch the router's engine calls once per MoE layer, fanning the layer out to shards.

Per layer: each shard hosting the layer receives only the tokens routed to at least one of its experts, with the
slots of experts it does not host masked to -1 (weight 0), so a shard never computes a non-hosted expert. All shards
of the layer are called concurrently (`ShardClient.submit` returns a future at once); their partial [T_i, H] outputs
are scattered back and summed in float32. Runs on the engine's worker thread (Engine.step is synchronous torch code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.runtime.dispatch import Dispatch
from moemesh.runtime.types import ExpertPlacement
from services.router.placement import Placement, ReplicaSplit
from services.router.step_trace import StepTrace, current_step


@dataclass(frozen=True)
class ForwardResult:
    """A completed Forward call."""

    output: torch.Tensor  # [T_i, H] partial sum over the shard's hosted selected experts
    compute_seconds: float  # reported by the shard
    seconds: float  # wall time from submit to response


class PendingForward(Protocol):
    """One in-flight Forward call."""

    def result(self) -> ForwardResult:
        """Blocks until the call completes; raises ExpertCallError on failure."""
        ...


class ShardClient(Protocol):
    """Transport to one expert shard (gRPC in expert_client.py)."""

    address: str

    def placement(self) -> ExpertPlacement: ...

    def submit(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, step_id: int,
        headers: dict[str, str],
    ) -> PendingForward: ...


class RemoteDispatch(Dispatch):
    """ExpertDispatch over shard clients, one client per entry of the placement (same order)."""

    def __init__(self, clients: Sequence[ShardClient], placement: Placement, num_experts: int) -> None:
        if len(clients) != len(placement.shards):
            raise ValueError(f"{len(clients)} clients for {len(placement.shards)} placed shards")
        self._clients = list(clients)
        self.placement = placement
        # hosted[i][e]: shard i hosts expert e. [S, E] bool, indexed with the token's expert ids.
        self._hosted = torch.zeros(len(clients), max(num_experts, 1), dtype=torch.bool)
        for i, shard in enumerate(placement.shards):
            ids = [e for e in shard.experts if 0 <= e < num_experts]
            self._hosted[i, ids] = True
        self._layer_shards: dict[int, list[int]] = {}
        self._hosted_on: dict[torch.device, torch.Tensor] = {}  # _hosted copied to the backbone's device
        self.split = ReplicaSplit.of(placement, num_experts)  # None unless experts have replicas

    @classmethod
    def connect(cls, clients: Sequence[ShardClient], moe_layers: tuple[int, ...], num_experts: int) -> RemoteDispatch:
        """Learns each shard's placement and checks that every expert of every MoE layer is hosted exactly once."""
        placement = Placement(tuple(c.placement() for c in clients))
        placement.validate(moe_layers, num_experts)
        return cls(clients, placement, num_experts)

    def _shards_of(self, layer: int) -> list[int]:
        if layer not in self._layer_shards:
            self._layer_shards[layer] = self.placement.shards_for_layer(layer)
        return self._layer_shards[layer]

    def _hosted_mask(self, device: torch.device) -> torch.Tensor:
        hosted = self._hosted_on.get(device)
        if hosted is None:
            hosted = self._hosted_on[device] = self._hosted.to(device)
        return hosted  # [S, E] bool

    def _grpc_submit(self, i: int, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, step: StepTrace | None,
                     assigned: torch.Tensor | None = None) -> tuple | None:
        """Starts shard i's Forward with only its tokens; None when no token selected one of its experts.
        assigned: [T, K] shard of each slot when experts have replicas (ReplicaSplit.assign)."""
        if assigned is not None:
            mine = assigned == i  # [T, K]
        else:
            mine = self._hosted_mask(topk_ids.device)[i][topk_ids.clamp(min=0)] & (topk_ids >= 0)  # [T, K]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [T_i] tokens with at least one expert here
        if rows.numel() == 0:
            return None
        ids = torch.where(mine, topk_ids, -1)[rows].to(torch.int32)  # [T_i, K]
        weights = torch.where(mine, topk_weights, 0.0)[rows].to(torch.float32)  # [T_i, K]
        block = hidden[rows].contiguous()  # [T_i, H]
        headers = step.headers(i, self._clients[i].address, layer) if step else {}
        sent = block.numel() * block.element_size() + ids.numel() * 4 + weights.numel() * 4
        pending = self._clients[i].submit(layer, block, ids, weights, step.step_id if step else 0, headers)
        return i, rows, pending, sent

    def _grpc_collect(self, call: tuple, layer: int, out: torch.Tensor, step: StepTrace | None) -> None:
        """Waits for one Forward and adds its partial [T_i, H] into out [T, H] (float32)."""
        i, rows, pending, sent = call
        done = pending.result()
        partial = done.output  # [T_i, H]
        out.index_add_(0, rows, partial.to(device=out.device, dtype=torch.float32))
        if step is not None:
            step.record(i, layer, tokens=int(rows.numel()), bytes_sent=sent,
                        bytes_received=partial.numel() * partial.element_size(),
                        seconds=done.seconds, compute_seconds=done.compute_seconds)

    def submit(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple:
        # hidden [T, H]; topk_ids [T, K] int64 (-1 unused); topk_weights [T, K] float32. Every shard's call is in
        # flight before submit returns (the backbone computes the shared expert meanwhile).
        step = current_step()
        assigned = self.split.assign(layer, topk_ids) if self.split is not None else None
        calls = [self._grpc_submit(i, layer, hidden, topk_ids, topk_weights, step, assigned)
                 for i in self._shards_of(layer)]
        return layer, hidden, [c for c in calls if c is not None], step

    def collect(self, handle: tuple) -> torch.Tensor:
        layer, hidden, calls, step = handle
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, H] accumulator
        for call in calls:
            self._grpc_collect(call, layer, out, step)
        return out.to(hidden.dtype)


__all__ = ["ForwardResult", "PendingForward", "RemoteDispatch", "ShardClient", "StepTrace"]
