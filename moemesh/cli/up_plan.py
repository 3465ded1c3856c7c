"""What `moemesh up` starts: the services (one OS process each), their ports, peer addresses (*_ADDR) and env, as
one supervisor Child per service. Pure planning: nothing starts here (moemesh/cli/up.py starts and watches them)."""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from moemesh import home
from moemesh.cli import data_plane, up_replicas
from moemesh.serving import ports
from moemesh.serving.server import READY_FILE_ENV
from moemesh.serving.supervisor import Child

DEV_TENANT = "default"  # = services.metering.bootstrap.DEV_TENANT (not imported: it pulls in redis)
# name -> (module, gRPC service whose health says the process is ready)
SERVICES = {
    "metering": ("services.metering", "moemesh.v1.Metering"),
    "tokenizer": ("services.tokenizer", "moemesh.v1.Tokenizer"),
    "expert-0": ("services.expert", "moemesh.v1.Expert"),
    "expert-1": ("services.expert", "moemesh.v1.Expert"),
    "router": ("services.router", "moemesh.v1.Router"),
    "batcher": ("services.batcher", "moemesh.v1.Batcher"),
    "gateway": ("gateway", "moemesh.v1.Chat"),
}
# Seconds each service may drain when stopped (MOEMESH_<SERVICE>_GRACE); others 1 s: nothing is in flight once their
# callers stopped.
GRACE_S = {"gateway": 6.0, "batcher": 2.0}

# Internal ports come from below the kernel's ephemeral range (32768-60999 on Linux): a port probed free here is
# bound by its service seconds later, and in between any outgoing connection could take an ephemeral port, while
# nothing takes one of these unless it listens on it explicitly.
_INTERNAL_PORTS = range(20000, 32000)


def _free_ports(host: str, count: int, taken: set[int]) -> list[int]:
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.choice(_INTERNAL_PORTS)
        if port not in taken and port not in ports and port_free(host, port):
            ports.append(port)
    return ports


def port_free(host: str, port: int) -> bool:
    return ports.port_free(host, port)  # SO_REUSEADDR: a port left in TIME_WAIT by a stopped mesh is free


def plan(ns: argparse.Namespace, run_dir: Path) -> dict[str, Child]:
    """The seven children with their ports, peer addresses and env."""
    gpus = _visible_gpus(ns.device)
    planned = data_plane.planned_shards(getattr(ns, "placement", None), ns.expert_shards)
    shards = len(planned) if planned else data_plane.expert_shard_count(ns.device, ns.expert_shards, gpus)
    experts = [f"expert-{i}" for i in range(shards)]
    for name in experts:
        SERVICES.setdefault(name, SERVICES["expert-0"])
    routers = getattr(ns, "routers", 1)
    up_replicas.check(routers, shards)
    up_replicas.register(SERVICES, routers)
    internal = [n for n in SERVICES if n != "gateway" and (not n.startswith("expert-") or n in experts)
                and up_replicas.included(n, routers)]
    ports = dict(zip(internal, _free_ports(ns.host, len(internal), {ns.gateway_port})))
    ports["gateway"] = ns.gateway_port
    addr = {name: f"{ns.host}:{port}" for name, port in ports.items()}
    model = str(Path(ns.model).resolve()) if Path(ns.model).is_dir() else ns.model
    base = {**os.environ, "MOEMESH_MODEL": model, "PYTHONUNBUFFERED": "1",
            "TOKENIZER_ADDR": addr["tokenizer"], "BATCHER_ADDR": addr["batcher"], "ROUTER_ADDR": addr["router"],
            "EXPERT_ADDRS": ",".join(addr[n] for n in experts), "METERING_ADDR": addr["metering"],
            "GATEWAY_ADDR": addr["gateway"], "MOEMESH_HOME": str(home.home()),
            "MOEMESH_QUANTIZATION": getattr(ns, "quantization", "none"),
            "MOEMESH_BACKEND": getattr(ns, "backend", "torch"),
            "MOEMESH_KV_CACHE_DTYPE": getattr(ns, "kv_cache_dtype", "auto")}
    children = {}
    for name, (module, _) in SERVICES.items():
        if name not in addr:
            continue
        kind = name.split("-")[0].upper()
        env = {**base, "OTEL_SERVICE_NAME": name, READY_FILE_ENV: str(run_dir / f"{name}.json"),
               f"MOEMESH_{kind}_HOST": ns.host, f"MOEMESH_{kind}_PORT": str(ports[name]),
               f"MOEMESH_{kind}_METRICS_PORT": "0", f"MOEMESH_{kind}_GRACE": str(GRACE_S.get(name, 1.0))}
        if kind == "EXPERT":
            env.update(MOEMESH_EXPERT_SHARD_INDEX=name.split("-")[1])
        env.update(data_plane.service_env(kind, int(name.split("-")[-1]) if kind == "EXPERT" else 0, shards,
                                          ns.device, ns.dtype, ns.load_format, gpus))
        env.update(data_plane.thread_env(kind, num_shards=shards))  # torch threads, passive OpenMP waits
        env.update(data_plane.placement_env(kind, int(name.split("-")[-1]) if kind == "EXPERT" else 0, planned,
                                            getattr(ns, "placement", None), getattr(ns, "expert_transport", None)))
        env.update(up_replicas.peer_env(name, addr, routers))  # batcher-i -> router-i, gateway -> every batcher
        env.update(up_replicas.device_env(name, ns.device, gpus) if routers > 1 else {})  # router i on GPU i
        if name == "metering" and not ns.no_auth:
            env["MOEMESH_METERING_DEV_TENANT"] = DEV_TENANT
        if name == "gateway":
            env["MOEMESH_GATEWAY_AUTH"] = "false" if ns.no_auth else "true"
        children[name] = Child(name, [sys.executable, "-m", module], env, home.subdir("logs") / f"{name}.log",
                               nice=data_plane.nice_of(name), sched_batch=data_plane.sched_batch_of(name))
    return children


def _visible_gpus(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch  # only for --device cuda

    return torch.cuda.device_count()
