"""EPLB-style expert placement from observed per-expert load, and the placement file (pure Python: `moemesh
placement` and `moemesh up` read it without importing torch).

plan(weights, num_shards, replicas), after DeepSeek's EPLB (github.com/deepseek-ai/EPLB, replicate_experts +
balanced_packing, global policy):
  1. replicate: `replicas` times, the expert with the largest load per replica gets one more replica;
  2. pack: the replicas, heaviest (load / replica count) first, each to the least loaded shard that still has room
     (ceil((E + R) / N) slots) and does not hold that expert yet (two replicas on one shard would balance nothing).
Per layer (the CLI's default, plan_layers): one plan per MoE layer from that layer's load, as DeepSeek's EPLB does;
a shard then hosts a different expert set per layer (services/expert/layered_bank.py) and the router takes the
per-layer owners from the file. Global (`--global`, plan): one placement for every MoE layer, from the per-expert
loads summed over the layers (a shard hosts the same experts in each layer).
At run time the router splits a replicated expert's tokens between its replicas on the device (token t of a step
goes to replica (t + offset) % count, in shard order: services/router/placement.py ReplicaSplit), so each replica
carries about load / count.

The file (JSON): {"version": 1, "num_experts": E, "shards": [[expert ids of shard 0], ...], "source": "...",
"before": {...}, "after": {...}} (before/after: the expected shard loads, for the person reading it); a per-layer
file adds "layers": {"<layer>": [[expert ids of shard 0 in that layer], ...]} and "shards" is then, per shard, the
union over its layers (what the shard reports in Info).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

VERSION = 1
_PROM = re.compile(r'^moemesh_expert_tokens_total\{([^}]*)\}\s+([0-9.eE+-]+)')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class PlacementFileError(ValueError):
    """A placement file (or the load it is computed from) that cannot be used; the message names what is wrong."""


def contiguous(num_experts: int, num_shards: int) -> list[list[int]]:
    """The default split (= moemesh.runtime.experts.shard_experts for every index)."""
    return [list(range(i * num_experts // num_shards, (i + 1) * num_experts // num_shards)) for i in range(num_shards)]


def _replicate(weights: Sequence[float], replicas: int, num_shards: int) -> list[int]:
    """Replica count per expert (EPLB replicate_experts), at most num_shards each."""
    counts = [1] * len(weights)
    for _ in range(replicas):
        open_ = [e for e in range(len(weights)) if counts[e] < num_shards]
        if not open_:
            break
        hot = max(open_, key=lambda e: (weights[e] / counts[e], -e))  # ties: the lower id (deterministic)
        counts[hot] += 1
    return counts


def plan(weights: Sequence[float], num_shards: int, replicas: int = 0) -> list[list[int]]:
    """Expert ids per shard: every expert at least once, `replicas` extra replicas of the hottest ones."""
    num_experts = len(weights)
    if not 1 <= num_shards <= num_experts:
        raise PlacementFileError(f"--shards {num_shards} must be in 1..{num_experts} (the model's experts)")
    if replicas < 0:
        raise PlacementFileError(f"--replicas {replicas} must be >= 0")
    counts = _replicate(weights, replicas, num_shards)
    items = sorted(((weights[e] / counts[e], e) for e in range(num_experts) for _ in range(counts[e])),
                   key=lambda item: (-item[0], item[1]))
    capacity = -(-len(items) // num_shards)  # ceil
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    load = [0.0] * num_shards
    for weight, e in items:
        room = [s for s in range(num_shards) if len(shards[s]) < capacity and e not in shards[s]]
        best = min(room, key=lambda s: (load[s], s))
        shards[best].append(e)
        load[best] += weight
    return [sorted(s) for s in shards]


def shard_loads(weights: Sequence[float], shards: Sequence[Sequence[int]]) -> list[float]:
    """Expected tokens per shard: each expert's load split evenly over its replicas."""
    counts = [0] * len(weights)
    for experts in shards:
        for e in experts:
            counts[e] += 1
    return [sum(weights[e] / counts[e] for e in experts) for experts in shards]


def imbalance(loads: Sequence[float]) -> float:
    """max / mean shard load (1.0: perfectly balanced; 0 loads: 1.0)."""
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def summed(load: Mapping[int, Sequence[float]]) -> list[float]:
    """{layer: [tokens per expert]} -> tokens per expert over all layers."""
    if not load:
        raise PlacementFileError("no expert load: the router has counted no tokens yet (send some traffic first)")
    rows = list(load.values())
    if len({len(r) for r in rows}) != 1:
        raise PlacementFileError(f"layers list different expert counts: {sorted({len(r) for r in rows})}")
    return [float(sum(col)) for col in zip(*rows)]


def parse_prometheus(text: str) -> dict[int, list[float]]:
    """{layer: [tokens per expert]} from Prometheus text with moemesh_expert_tokens_total{layer,expert} samples."""
    cells: dict[tuple[int, int], float] = {}
    for line in text.splitlines():
        match = _PROM.match(line.strip())
        if match:
            labels = dict(_LABEL.findall(match.group(1)))
            cells[int(labels["layer"]), int(labels["expert"])] = float(match.group(2))
    if not cells:
        raise PlacementFileError("no moemesh_expert_tokens_total{layer,expert} samples in the metrics text")
    num_experts = 1 + max(e for _, e in cells)
    out: dict[int, list[float]] = {}
    for (layer, e), value in cells.items():
        out.setdefault(layer, [0.0] * num_experts)[e] = value
    return dict(sorted(out.items()))


def check(shards: Sequence[Sequence[int]], num_experts: int, where: str = "placement") -> None:
    """PlacementFileError naming the shard and experts when a shard is empty, lists an expert twice or out of
    range, or an expert is hosted by no shard."""
    if not shards:
        raise PlacementFileError(f"{where}: no shards")
    for i, experts in enumerate(shards):
        bad = [e for e in experts if not isinstance(e, int) or not 0 <= e < num_experts]
        if not experts or bad or len(set(experts)) != len(experts):
            raise PlacementFileError(f"{where}: shard {i} hosts {list(experts)!r}: needs distinct expert ids in "
                                     f"0..{num_experts - 1}" + (f" (bad: {bad})" if bad else ""))
    hosted = {e for experts in shards for e in experts}
    nowhere = [e for e in range(num_experts) if e not in hosted]
    if nowhere:
        raise PlacementFileError(f"{where}: experts {nowhere} are hosted by no shard; every expert needs at least "
                                 "one (run `moemesh placement` again or add them to a shard)")


def plan_layers(load: Mapping[int, Sequence[float]], num_shards: int, replicas: int = 0) -> dict[int, list[list[int]]]:
    """One plan per MoE layer from that layer's load (`replicas` extra replicas in each layer)."""
    return {layer: plan(weights, num_shards, replicas) for layer, weights in sorted(load.items())}


def union(per_layer: Mapping[int, Sequence[Sequence[int]]]) -> list[list[int]]:
    """Per shard, the experts it hosts in any layer."""
    rows = list(per_layer.values())
    return [sorted({e for row in rows for e in row[i]}) for i in range(len(rows[0]))]


def _loads(load: Mapping[int, Sequence[float]], layouts: Mapping[int, Sequence[Sequence[int]]]) -> dict:
    """Expected shard loads: per layer (each layer waits for its slowest shard) and summed over the layers."""
    per_layer = {layer: shard_loads(load[layer], layouts[layer]) for layer in load}
    total = [sum(col) for col in zip(*per_layer.values())]
    return {"shard_tokens": total, "max_over_mean": sum(map(imbalance, per_layer.values())) / len(per_layer),
            "max_over_mean_total": imbalance(total)}


def write(path: Path, shards: list[list[int]], num_experts: int, source: str, load: Mapping[int, Sequence[float]],
          per_layer: Mapping[int, list[list[int]]] | None = None) -> dict:
    """Writes the file; shards: per shard its experts (global), or per_layer: {layer: per shard its experts}."""
    base = contiguous(num_experts, len(shards))
    doc = {"version": VERSION, "num_experts": num_experts, "shards": shards, "source": source,
           "before": {"split": "contiguous", **_loads(load, {layer: base for layer in load})},
           "after": _loads(load, per_layer or {layer: shards for layer in load})}
    if per_layer:
        doc["layers"] = {str(layer): rows for layer, rows in per_layer.items()}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def read(path: str | Path) -> tuple[list[list[int]], int]:
    """(expert ids per shard, num_experts) from a placement file; PlacementFileError naming the problem."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PlacementFileError(f"placement file {str(path)!r}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("shards"), list):
        raise PlacementFileError(f"placement file {str(path)!r}: not a version {VERSION} file from `moemesh "
                                 "placement` (needs 'version' and 'shards')")
    shards, num_experts = doc["shards"], doc.get("num_experts")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise PlacementFileError(f"placement file {str(path)!r}: num_experts {num_experts!r} is not a positive int")
    if not all(isinstance(s, list) for s in shards):
        raise PlacementFileError(f"placement file {str(path)!r}: 'shards' must be a list of expert id lists")
    check(shards, num_experts, f"placement file {str(path)!r}")
    return [list(s) for s in shards], num_experts


def read_layers(path: str | Path) -> dict[int, list[list[int]]] | None:
    """{layer: expert ids per shard} of a per-layer file (checked like `shards`, layer by layer), None for a global
    one."""
    shards, num_experts = read(path)
    doc = json.loads(Path(path).read_text())
    if "layers" not in doc:
        return None
    out: dict[int, list[list[int]]] = {}
    for layer, rows in doc["layers"].items():
        where = f"placement file {str(path)!r}, layer {layer}"
        if not isinstance(rows, list) or len(rows) != len(shards):
            raise PlacementFileError(f"{where}: needs one expert list per shard ({len(shards)})")
        check(rows, num_experts, where)
        out[int(layer)] = [list(r) for r in rows]
    if union(out) != [sorted(s) for s in shards]:
        raise PlacementFileError(f"placement file {str(path)!r}: 'shards' is not the union of its per-layer lists")
    return out
