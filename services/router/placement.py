"""Expert placement: which shard hosts which (layer, expert), learned from each shard's Info at start-up.

Invariant checked before the router serves: every routed expert of every MoE layer is hosted by at least one shard,
and by exactly one unless replicas are declared (a placement file from `moemesh placement`, router --placement).
A gap would silently drop expert contributions (wrong outputs, no error); an undeclared duplicate is a
misconfiguration. Declared replicas split the expert's tokens between them (ReplicaSplit): each (token, slot) is
computed by exactly one shard, so nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.runtime.types import ExpertPlacement


class PlacementError(ValueError):
    """The shards do not cover every expert of every MoE layer exactly once (a configuration error)."""


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5" (compact error messages for 128-expert models)."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(ids):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Placement:
    """The shards in EXPERT_ADDRS order, with a (layer, expert) -> shard index lookup."""

    shards: tuple[ExpertPlacement, ...]

    def owner(self, layer: int, expert: int) -> list[int]:
        """Indices of the shards hosting `expert` in `layer` (one once validated without replicas)."""
        return [i for i, s in enumerate(self.shards) if layer in s.layers and expert in s.experts]

    def shards_for_layer(self, layer: int) -> list[int]:
        return [i for i, s in enumerate(self.shards) if layer in s.layers]

    def _coverage(self, moe_layers: tuple[int, ...], num_experts: int) -> tuple[list[str], list[str]]:
        """(missing, doubled): per layer, the experts hosted by no shard and by several shards."""
        missing: list[str] = []
        doubled: list[str] = []
        for layer in moe_layers:
            counts = [0] * num_experts
            for s in self.shards:
                if layer in s.layers:
                    for e in s.experts:
                        if 0 <= e < num_experts:
                            counts[e] += 1
            gaps = [e for e, c in enumerate(counts) if c == 0]
            dups = [e for e, c in enumerate(counts) if c > 1]
            if gaps:
                missing.append(f"layer {layer}: experts {_ranges(gaps)}")
            if dups:
                doubled.append(f"layer {layer}: experts {_ranges(dups)}")
        return missing, doubled

    def replicated(self, num_experts: int) -> bool:
        """Whether some (layer, expert) is hosted by several shards (ids outside 0..num_experts-1 ignored)."""
        seen: dict[int, set[int]] = {}
        for s in self.shards:
            mine = {e for e in s.experts if 0 <= e < num_experts}
            for layer in s.layers:
                hosted = seen.setdefault(layer, set())
                if hosted & mine:
                    return True
                hosted |= mine
        return False

    def validate(self, moe_layers: tuple[int, ...], num_experts: int, replicas: bool = False) -> None:
        """Raise PlacementError naming the missing (or, without declared `replicas`, doubly hosted) experts and
        what to do about it."""
        if not self.shards:
            raise PlacementError("no expert shards configured: set EXPERT_ADDRS (comma-separated host:port list)")
        missing, doubled = self._coverage(moe_layers, num_experts)
        if replicas:
            doubled = []
        out_of_range = [s.address for s in self.shards if any(e < 0 or e >= num_experts for e in s.experts)]
        problems: list[str] = []
        if missing:
            problems.append("experts hosted by no shard: " + "; ".join(missing))
        if doubled:
            problems.append("experts hosted by more than one shard: " + "; ".join(doubled))
        if out_of_range:
            problems.append(f"shards hosting expert ids >= num_experts {num_experts}: {', '.join(out_of_range)}")
        if problems:
            layout = "; ".join(
                f"{s.address} hosts experts {_ranges(list(s.experts))} of layers {_ranges(list(s.layers))}"
                for s in self.shards
            )
            raise PlacementError(
                "expert placement is incomplete or overlapping ("
                + " | ".join(problems)
                + f"). Current shards: {layout}. Start one shard per index 0..N-1 with the same "
                "MOEMESH_EXPERT_NUM_SHARDS (or explicit disjoint MOEMESH_EXPERT_EXPERTS lists covering every expert, "
                "or a placement file from `moemesh placement` for replicas), and list all of them, in shard order, "
                "in EXPERT_ADDRS."
            )


def check_same_model(shards: list[tuple[str, str, str, tuple[int, ...]]]) -> None:
    """shards: (address, model, dtype, experts) from each shard's Info. Raise PlacementError naming the shards and
    their experts when they do not all serve the same model in the same dtype (their partial sums would not add up)."""
    for what, index in (("models", 1), ("dtypes", 2)):
        if len({s[index] for s in shards}) > 1:
            layout = "; ".join(f"{a} serves {m!r} in {d} (experts {_ranges(list(e))})" for a, m, d, e in shards)
            raise PlacementError(f"expert shards of different {what}: {layout}. Start every shard with the "
                                 "router's model and dtype (MOEMESH_MODEL, MOEMESH_EXPERT_DTYPE).")


def check_file(shards: tuple[ExpertPlacement, ...], planned: list[list[int]]) -> None:
    """The shards host what the placement file says, shard by shard (else PlacementError naming them)."""
    if len(shards) != len(planned):
        raise PlacementError(f"the placement file lists {len(planned)} shards, EXPERT_ADDRS {len(shards)}: start "
                             "one shard per entry of the file, in its order")
    wrong = [f"{s.address} hosts experts {_ranges(list(s.experts))}, the file says {_ranges(want)}"
             for s, want in zip(shards, planned) if sorted(s.experts) != sorted(want)]
    if wrong:
        raise PlacementError("expert shards do not match the placement file: " + "; ".join(wrong) + ". Start shard "
                             "i with MOEMESH_EXPERT_EXPERTS set to entry i of the file (`moemesh up --placement` "
                             "does).")


class ReplicaSplit:
    """Which shard computes each (token, slot) when experts have replicas, decided on the device (no host sync).

    Per hosted layer: owners [E, R] the shard indices of each expert's replicas in shard order (padded by repeating
    the first), count [E] the replicas. assign() maps topk_ids [T, K] to the shard of each slot: replica
    (t + offset) % count[e], t the token's row, offset a host counter advanced per call (a batch-1 decode would
    otherwise always pick replica 0). -1 for unused slots."""

    def __init__(self, owners_by_layer: dict[int, list[list[int]]]) -> None:
        """owners_by_layer: layer -> per expert id, the shard indices hosting it in that layer (in shard order)."""
        self._owners = owners_by_layer
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, owners in owners_by_layer.items():
            owners = [o or [-1] for o in owners]
            width = max(len(o) for o in owners)
            table = torch.tensor([o + [o[0]] * (width - len(o)) for o in owners], dtype=torch.int64)  # [E, R]
            self._tables[layer] = table, torch.tensor([len(o) for o in owners], dtype=torch.int64)  # [E]
        self._on: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.offset = 0

    @classmethod
    def of(cls, placement: Placement, num_experts: int) -> ReplicaSplit | None:
        """The split when the placement has replicas, else None (every slot has one owner: nothing to split)."""
        if not placement.replicated(num_experts):
            return None
        layers = sorted({x for s in placement.shards for x in s.layers})
        return cls({layer: [placement.owner(layer, e) for e in range(num_experts)] for layer in layers})

    @classmethod
    def from_layers(cls, per_layer: dict[int, list[list[int]]], num_experts: int) -> ReplicaSplit:
        """From a per-layer placement file's {layer: expert ids per shard}: the shards host different experts per
        layer (their Info shows the union), so every slot is routed by the file, replicas or not."""
        return cls({layer: [[i for i, experts in enumerate(rows) if e in experts] for e in range(num_experts)]
                    for layer, rows in per_layer.items()})

    def without(self, lost: set[int]) -> ReplicaSplit | None:
        """The split with the shards in `lost` taken out (their experts' tokens go to the other replicas); None
        when an expert hosted in a layer would have no owner left."""
        owners = {layer: [[s for s in o if s not in lost] for o in rows] for layer, rows in self._owners.items()}
        pairs = ((before, after) for layer, rows in self._owners.items() for before, after in zip(rows, owners[layer]))
        if any(before and not after for before, after in pairs):
            return None
        return ReplicaSplit(owners)

    def _table(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, device)
        if key not in self._on:
            owners, count = self._tables[layer]
            self._on[key] = owners.to(device), count.to(device)
        return self._on[key]

    def assign(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, K] int64 (-1 unused) -> [T, K] int64 shard index of each slot (-1 unused)."""
        owners, count = self._table(layer, topk_ids.device)
        self.offset += 1
        ids = topk_ids.clamp(min=0)  # [T, K]
        rows = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(1)  # [T, 1]
        replica = (rows + self.offset) % count[ids]  # [T, K]
        return torch.where(topk_ids >= 0, owners[ids, replica], -1)

    @staticmethod
    def only(assigned: torch.Tensor, shard: int, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids, topk_weights) [T, K] with the slots of other shards unused (-1, weight 0)."""
        mine = assigned == shard
        return torch.where(mine, topk_ids, -1), torch.where(mine, topk_weights, 0.0)
