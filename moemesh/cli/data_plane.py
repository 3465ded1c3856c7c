"""What `moemesh up` does for the expert data plane: CPU thread defaults per service, the --expert-transport and
--placement flags (what the router and each shard get), and which transport the router
chose for each expert shard (Router.Info), for the printout and the status file (`services.<name>.transport`).

Threads (2-core CPU, smollm2-moe, measured with benchmarks/mesh_decode.py): the router computes while the shards
wait and the shards compute while the router waits: each shard gets its share of the cores, the router
cores // (shards + 1) (at least 1; every core when the experts are in the router).
OMP_WAIT_POLICY=PASSIVE: an OpenMP worker that spins after its parallel region (libgomp's default) takes a core from
the other processes; on 2 cores that alone made a shared-memory decode step 1.6x slower (74 vs 46 ms).
Priority: the front end (gateway, tokenizer, metering and its Redis) runs at nice FRONTEND_NICE, 0 by default. On a
quiet 2-core machine the niceness makes no measurable difference (benchmarks/results/mesh-decode-cpu.md, two runs:
batch 1 40.1 / 41.9 ms per token at nice 0 against 41.5 / 40.3 at nice 10, the in-process engine 38.7; batch 8 equal),
while on a host loaded by other work a reniced front end gets little CPU: at load ~10 batch-1 decode was 57 ms per
token at nice 0 against 69 at nice 10 (batch 8 the other way, 145 against 115 ms;
benchmarks/results/mesh-decode-cpu-loaded-nice.md), and at load 26 calls waited over 30 s to be taken in by the
gateway and gRPC cancelled them (`CANCELLED`, benchmarks/results/slow-readers.md). `MOEMESH_FRONTEND_NICE=10` is safe to use: a stop used to cut an HTTP stream
without its error event when the reniced gateway was starved (its in-band cut came after the edge had gone);
`moemesh up` now waits for the gateway before it stops the edge (moemesh/cli/up.py) and the gateway cuts 2.5 s before
its grace (gateway/closing.py). `MOEMESH_FRONTEND_SCHED=batch` runs the front end under SCHED_BATCH (a full CPU
share, but wake-ups that never preempt the router or a shard mid-layer): as fast as the others on a quiet machine.
Values already in the environment win.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import grpc

from moemesh.certs import grpc_tls
from moemesh.v1 import router_pb2, router_pb2_grpc


def thread_env(kind: str, num_shards: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Env defaults for a service of `kind` ("ROUTER", "EXPERT", ...): torch intra-op threads and a passive OpenMP
    wait policy for the compute processes; nothing for the others."""
    cores = os.cpu_count() or 1
    # The router with shard processes: its own work per layer is small (attention, norms, gates), where a second
    # OpenMP thread costs more than it brings and competes with the shards and the front end; on 2 cores 1 thread
    # took batch-1 streamed decode from 48.5 to 45.7 ms per token (benchmarks/mesh_decode.py).
    router = max(1, cores // (num_shards + 1)) if num_shards else cores
    threads = {"ROUTER": router, "EXPERT": max(1, cores // max(num_shards, 1))}.get(kind)
    if threads is None:
        return {}
    defaults = {f"MOEMESH_{kind}_COMPUTE_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    return {k: v for k, v in defaults.items() if k not in environ}


FRONTEND = ("gateway", "tokenizer", "metering")
FRONTEND_NICE = 0  # see the module doc (MOEMESH_FRONTEND_NICE=10 is safe, and no faster on a quiet machine)


def sched_batch_of(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether service `name` runs under SCHED_BATCH: the front end with MOEMESH_FRONTEND_SCHED=batch (its wake-ups
    then never preempt the router or a shard mid-layer, yet it keeps a full CPU share on a loaded host)."""
    raw = environ.get("MOEMESH_FRONTEND_SCHED", "normal").strip().lower()
    if raw not in ("normal", "batch"):
        raise ValueError(f"MOEMESH_FRONTEND_SCHED: {raw!r} is not 'normal' or 'batch'")
    return name in FRONTEND and raw == "batch"


def nice_of(name: str, environ: Mapping[str, str] = os.environ) -> int:
    """Niceness increment for service `name` (0 for the data plane: router, batcher, experts)."""
    if name not in FRONTEND:
        return 0
    raw = environ.get("MOEMESH_FRONTEND_NICE", str(FRONTEND_NICE))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MOEMESH_FRONTEND_NICE: {raw!r} is not an integer (0-19)") from None
    if not 0 <= value <= 19:
        raise ValueError(f"MOEMESH_FRONTEND_NICE: {value} is not in 0-19")
    return value


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def expert_transports(router_address: str, shard_addresses: Mapping[str, str], timeout: float = 5.0) -> dict[str, str]:
    """{service name: transport} from Router.Info's placement, matched by port (hosts may be spelled differently);
    {} when the router does not answer."""
    with grpc_tls.channel(router_address) as channel:
        try:
            info = router_pb2_grpc.RouterStub(channel).Info(router_pb2.RouterInfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return {}
    by_port = {_port(p.address): p.transport for p in info.placement if p.transport}
    return {name: by_port[_port(a)] for name, a in shard_addresses.items() if _port(a) in by_port}


def expert_shard_count(device: str, requested: int | None, visible_gpus: int) -> int:
    """Expert shard processes `moemesh up` starts: --expert-shards when given; on CUDA one per visible GPU, except
    that one GPU co-locates the experts with the router (0: the router's in-process bank, fused MoE + CUDA graphs);
    on CPU two."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--expert-shards {requested} must be >= 0")
        return requested
    if device.startswith("cuda"):
        return 0 if visible_gpus <= 1 else visible_gpus
    return 2


def service_env(kind: str, index: int, num_shards: int, device: str, dtype: str, load_format: str,
                visible_gpus: int) -> dict[str, str]:
    """Device, dtype and weights settings of the router and the expert shards (empty for other services); shard i
    of several on several GPUs gets cuda:i, every shard of one GPU that GPU."""
    if kind not in ("ROUTER", "EXPERT"):
        return {}
    env = {f"MOEMESH_{kind}_DEVICE": device, f"MOEMESH_{kind}_DTYPE": dtype, f"MOEMESH_{kind}_LOAD_FORMAT": load_format}
    if kind == "EXPERT":
        env["MOEMESH_EXPERT_NUM_SHARDS"] = str(num_shards)
        if device == "cuda" and visible_gpus > 1:
            env["MOEMESH_EXPERT_DEVICE"] = f"cuda:{index % visible_gpus}"
    return env


TRANSPORT_ENV = "MOEMESH_ROUTER_EXPERT_TRANSPORT"


def add_arguments(p) -> None:
    """`moemesh up` flags of the expert data plane."""
    p.add_argument("--expert-transport", default=None, choices=("auto", "shm", "dist", "cuda_ipc", "grpc"),
                   help="expert data plane (default auto, or MOEMESH_ROUTER_EXPERT_TRANSPORT): a forced one never "
                   "falls back to grpc; start-up or the step fails naming the shard")
    p.add_argument("--placement", default=None, metavar="FILE", help="expert placement from `moemesh placement` "
                   "(replicas of hot experts, per-layer expert sets): one shard per entry, the router splits "
                   "replicated experts' tokens")


def transport_line(flag: str | None, transports: Mapping[str, str], shards: int = 1) -> str:
    """The printout's line: the requested mode, then what the router chose per shard (Router.Info); with no shard
    processes, that the experts run in the router."""
    if not shards:
        return "  expert transport: none, the experts run in the router process (--expert-shards 0)"
    chosen = ", ".join(f"{n} {t}" for n, t in sorted(transports.items())) or "unknown"
    return f"  expert transport: {chosen} (--expert-transport {requested_transport(flag)})"


def requested_transport(flag: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The router's --expert-transport: the flag, else the env the router would read, else auto."""
    return flag or environ.get(TRANSPORT_ENV, "auto")


def planned_shards(path: str | None, requested: int | None) -> list[list[int]] | None:
    """Expert ids per shard from a `moemesh placement` file (None without one); ValueError naming the file when it
    is unusable or --expert-shards disagrees with it."""
    if not path:
        return None
    from moemesh.runtime.placement_plan import read  # pure Python (no torch)

    shards, _ = read(path)
    if requested is not None and requested != len(shards):
        raise ValueError(f"--expert-shards {requested} disagrees with --placement {path} ({len(shards)} shards); "
                         "leave --expert-shards out")
    return shards


def placement_env(kind: str, index: int, planned: list[list[int]] | None, path: str | None,
                  transport: str | None) -> dict[str, str]:
    """The router gets the placement file and the forced transport; shard i its experts from the file."""
    env: dict[str, str] = {}
    if kind == "ROUTER":
        if transport:
            env[TRANSPORT_ENV] = transport
        if planned:
            env["MOEMESH_ROUTER_PLACEMENT"] = str(os.path.abspath(path))
    if kind == "EXPERT" and planned:
        env["MOEMESH_EXPERT_EXPERTS"] = ",".join(map(str, planned[index]))  # per-layer files: the union
        from moemesh.runtime.placement_plan import read_layers

        if read_layers(path) is not None:  # per layer: the shard reads its entry of each layer
            env["MOEMESH_EXPERT_PLACEMENT"] = str(os.path.abspath(path))
    return env
