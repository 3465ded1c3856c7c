"""`moemesh placement`: an expert placement with replicas of the hottest experts, from observed load (EPLB-style:
moemesh/runtime/placement_plan.py; per MoE layer unless --global), written to a file that `moemesh up --placement
FILE` starts the shards with.

--from-metrics reads the router's per-expert token counters:
  host:port or grpc://host:port   Router.Info's expert_tokens (the router's gRPC address, e.g. from the status file)
  http(s)://host:port/metrics     Prometheus text (moemesh_expert_tokens_total{layer,expert})
  FILE                            saved Prometheus text, or Router.Info as JSON (expert_tokens / expertTokens)
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from moemesh.runtime import placement_plan


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("placement", help="expert placement with replicas of the hottest experts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-metrics", required=True, metavar="URL_OR_FILE",
                   help="router address (Router.Info), Prometheus /metrics URL, or a saved file")
    p.add_argument("--shards", type=int, required=True, help="expert shard processes to place the experts on")
    p.add_argument("--replicas", type=int, default=None,
                   help="extra expert replicas in all (default: one per shard)")
    p.add_argument("--global", dest="per_layer", action="store_false", help="one expert set per shard for all "
                   "layers, from the load summed over them (default: one placement per MoE layer, as DeepSeek's "
                   "EPLB; shards then host a different set per layer, which needs the torch expert backend)")
    p.add_argument("--out", type=Path, required=True, help="placement file to write (JSON)")
    p.set_defaults(func=run)


def _router_info_load(address: str) -> dict[int, list[float]]:
    import grpc

    from moemesh.certs import grpc_tls
    from moemesh.v1 import router_pb2, router_pb2_grpc

    with grpc_tls.channel(address) as channel:
        try:
            info = router_pb2_grpc.RouterStub(channel).Info(router_pb2.RouterInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            raise placement_plan.PlacementFileError(f"--from-metrics {address}: Router.Info failed: "
                                                    f"{exc.code().name} {exc.details()}") from None
    return {row.layer: [float(t) for t in row.tokens] for row in info.expert_tokens}


def _json_load(doc: dict, source: str) -> dict[int, list[float]]:
    rows = doc.get("expert_tokens", doc.get("expertTokens"))
    if not isinstance(rows, list):
        raise placement_plan.PlacementFileError(f"--from-metrics {source}: JSON without expert_tokens (save "
                                                "Router.Info, or use the Prometheus text)")
    return {int(r.get("layer", 0)): [float(t) for t in r.get("tokens", [])] for r in rows}


def load_from(source: str) -> dict[int, list[float]]:
    """{layer: [tokens per expert]} from a router address, a /metrics URL or a file (see the module doc)."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=10) as response:
                return placement_plan.parse_prometheus(response.read().decode())
        except OSError as exc:
            raise placement_plan.PlacementFileError(f"--from-metrics {source}: {exc}") from None
    path = Path(source)
    if path.is_file():
        text = path.read_text()
        if text.lstrip().startswith("{"):
            return _json_load(json.loads(text), source)
        return placement_plan.parse_prometheus(text)
    address = source.removeprefix("grpc://")
    if address.rpartition(":")[2].isdigit():
        return _router_info_load(address)
    raise placement_plan.PlacementFileError(f"--from-metrics {source!r} is neither a file, an http(s) URL nor a "
                                            "router host:port")


def run(ns: argparse.Namespace) -> int:
    load = load_from(ns.from_metrics)
    weights = placement_plan.summed(load)
    replicas = ns.shards if ns.replicas is None else ns.replicas
    per_layer = placement_plan.plan_layers(load, ns.shards, replicas) if ns.per_layer else None
    shards = placement_plan.union(per_layer) if per_layer else placement_plan.plan(weights, ns.shards, replicas)
    doc = placement_plan.write(ns.out, shards, len(weights), ns.from_metrics, load, per_layer)
    print(f"{'shard':<6} {'experts':<40} {'tokens before':>14} {'tokens after':>13}")
    before, after = doc["before"]["shard_tokens"], doc["after"]["shard_tokens"]
    for i, experts in enumerate(shards):  # per layer: the union over the layers
        print(f"{i:<6} {','.join(map(str, experts)):<40} {before[i]:>14.0f} {after[i]:>13.0f}")
    print(f"max/mean shard load, mean over layers: {doc['before']['max_over_mean']:.3f} (contiguous split) -> "
          f"{doc['after']['max_over_mean']:.3f} with {replicas} replicas"
          f"{' per layer' if per_layer else ''}; written to {ns.out}")
    print(f"start it: moemesh up --placement {ns.out}")
    return 0
