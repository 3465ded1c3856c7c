"""`moemesh up --routers N`: N data-parallel replicas (a router and its batcher each) sharing the expert shards (M:N).

Replica 0 keeps the names `router` and `batcher` (what `moemesh chat`, `top`, the dashboard and the single-replica
status file already read); replica i > 0 is `router-i` and `batcher-i`. Each batcher talks to its own router
(ROUTER_ADDR); every router attaches to every shard over the chosen transport (EXPERT_ADDRS is the same for all:
a shard serves one attachment per router, services/expert/shm_server.py); the gateway gets every batcher
(BATCHER_ADDR "a,b": gateway/batcher_pool.py spreads requests over them).
"""

from __future__ import annotations

from collections.abc import Mapping

REPLICATED = ("router", "batcher")


def add_arguments(p) -> None:
    p.add_argument("--routers", type=int, default=1, help="data-parallel replicas (a router and its batcher each) "
                   "sharing the expert shards; the gateway spreads requests over their batchers (default 1)")


def check(routers: int, expert_shards: int) -> None:
    """ValueError naming the flag when N replicas cannot share the planned shards."""
    if routers < 1:
        raise ValueError(f"--routers {routers} must be >= 1")
    if routers > 1 and expert_shards == 0:
        raise ValueError(f"--routers {routers} needs expert shard processes to share (--expert-shards 0 puts the "
                         "experts inside the one router)")


def names(routers: int) -> list[tuple[str, str]]:
    """(router, batcher) service names per replica."""
    return [(f"router-{i}", f"batcher-{i}") if i else REPLICATED for i in range(routers)]


def register(services: dict, routers: int) -> None:
    """Adds replica i > 0's services to `services` (name -> (module, health service)) as copies of replica 0's."""
    for router, batcher in names(routers)[1:]:
        services.setdefault(router, services["router"])
        services.setdefault(batcher, services["batcher"])


def included(name: str, routers: int) -> bool:
    """False for a replica service beyond --routers (SERVICES may list more from an earlier plan)."""
    kind, _, index = name.partition("-")
    return kind not in REPLICATED or not index or int(index) < routers


def peer_env(name: str, addr: Mapping[str, str], routers: int) -> dict[str, str]:
    """Env overrides that wire the replicas: batcher-i -> router-i; the gateway -> every batcher."""
    kind, _, index = name.partition("-")
    if kind == "batcher" and index:
        return {"ROUTER_ADDR": addr[f"router-{index}"]}
    if name == "gateway":
        return {"BATCHER_ADDR": ",".join(addr[b] for _, b in names(routers))}
    return {}


def device_env(name: str, device: str, visible_gpus: int) -> dict[str, str]:
    """Router i on GPU i % visible GPUs (one router per GPU with several: each replica its own GPU for attention and
    KV cache); nothing on the CPU or one GPU."""
    kind, _, index = name.partition("-")
    if kind != "router" or device != "cuda" or visible_gpus < 2:
        return {}
    return {"MOEMESH_ROUTER_DEVICE": f"cuda:{int(index or 0) % visible_gpus}"}


def stop_waves(waves: list[list[str]], children: Mapping[str, object]) -> list[list[str]]:
    """STOP_WAVES with every replica's router and batcher in the wave of replica 0's."""
    extra = {base: [n for n in children if n.startswith(f"{base}-")] for base in REPLICATED}
    return [[*wave, *(n for base in REPLICATED if base in wave for n in extra[base])] for wave in waves]


def status(ready: Mapping[str, dict], routers: int, transports: Mapping[str, Mapping[str, str]]) -> list[dict]:
    """The status file's `replicas`: per replica its router and batcher (name, address) and the transport the router
    chose per shard (Router.Info)."""
    return [{"router": r, "router_address": ready[r]["address"], "batcher": b, "batcher_address": ready[b]["address"],
             "transports": dict(transports.get(r, {}))} for r, b in names(routers)]


def lines(replicas: list[dict]) -> list[str]:
    """The printout's replica lines (only with several)."""
    if len(replicas) < 2:
        return []
    out = [f"  replicas: {len(replicas)} (router + batcher each, sharing the expert shards)"]
    for i, r in enumerate(replicas):
        chosen = ", ".join(f"{n} {t}" for n, t in sorted(r["transports"].items())) or "unknown"
        out.append(f"    {i}: {r['router']} {r['router_address']}, {r['batcher']} {r['batcher_address']}; "
                   f"experts: {chosen}")
    return out
