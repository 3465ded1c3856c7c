"""Expert placement: which shard hosts which (layer, expert), learned from each shard's Info at start-up.

Invariant checked before the router serves: every routed expert of every MoE layer is hosted by exactly one shard.
A gap would silently drop expert contributions (wrong outputs, no error), a duplicate would count them twice.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        """Indices of the shards hosting `expert` in `layer` (exactly one once validated)."""
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

    def validate(self, moe_layers: tuple[int, ...], num_experts: int) -> None:
        """Raise PlacementError naming the missing or doubly hosted experts and what to do about it."""
        if not self.shards:
            raise PlacementError("no expert shards configured: set EXPERT_ADDRS (comma-separated host:port list)")
        missing, doubled = self._coverage(moe_layers, num_experts)
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
                "MOEMESH_EXPERT_NUM_SHARDS (or explicit disjoint MOEMESH_EXPERT_EXPERTS lists covering every expert), "
                "and list all of them, in shard order, in EXPERT_ADDRS."
            )


def check_same_model(shards: list[tuple[str, str, str, tuple[int, ...]]]) -> None:
    """shards: (address, model, dtype, experts) from each shard's Info. Raise PlacementError naming the shards and
    their experts when they do not all serve the same model in the same dtype (their partial sums would not add up)."""
    for what, index in (("models", 1), ("dtypes", 2)):
        if len({s[index] for s in shards}) > 1:
            layout = "; ".join(f"{a} serves {m!r} in {d} (experts {_ranges(list(e))})" for a, m, d, e in shards)
            raise PlacementError(f"expert shards of different {what}: {layout}. Start every shard with the "
                                 "router's model and dtype (MOEMESH_MODEL, MOEMESH_EXPERT_DTYPE).")
