"""`moemesh up`: the whole mesh on this machine, one OS process per service, under one supervisor.

Starts metering, tokenizer, two expert shards, router, batcher and gateway (`python -m services.<name>`,
`python -m gateway`), peers wired through the *_ADDR env variables; waits until every health check says SERVING;
prints the endpoints; writes the status file (default MOEMESH_HOME/run/status.json) with each service's address, pid
and metrics port, the gateway address under `gateway`, and the dev API key. Ctrl-C or SIGTERM stops everything
within 10 s: the gateway first (it drains client streams), then the rest; SIGKILL for anything left. Children die
with the supervisor even if it is SIGKILLed (PR_SET_PDEATHSIG). Logs: MOEMESH_HOME/logs/<service>.log.
A service that dies or stalls later is restarted on its port (moemesh/cli/supervision.py: --max-restarts,
--restart-window). `--routers N` starts N router + batcher replicas sharing the expert shards (up_replicas.py).
Which processes, on which ports, with which env: up_plan.py.

Auth is on: metering makes sure the dev tenant "default" exists (MOEMESH_METERING_DEV_TENANT) and its key lands in the
status file as `api_key`, where `moemesh chat` finds it. `--no-auth` runs the gateway without metering checks (tenant
"default", no usage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh import home
from moemesh.certs import grpc_tls
from moemesh.cli import data_plane, supervision, up_replicas
from moemesh.cli.progress import StartProgress, first_start_note
from moemesh.cli.up_plan import SERVICES, plan, port_free
from moemesh.dashboard import mesh_hook as dashboard_hook
from moemesh.edge import mesh_hook as edge_hook
from moemesh.serving import status as status_file
from moemesh.serving.server import exit_now
from moemesh.serving.supervisor import Child, stop_in_order

# Shutdown order: nothing is cut off upstream of a draining caller. The edge goes after the gateway: Envoy exits at
# once on SIGTERM, while the gateway ends its streams in-band (error event, then [DONE] over HTTP) within its grace.
STOP_WAVES = [["gateway"], ["edge"], ["batcher"], ["router", "tokenizer"], ["expert-0", "expert-1", "metering"]]
STOP_BUDGET_S = 10.0
# The edge is told only once the gateway has exited (or after this long): the gateway's grace (up_plan.GRACE_S, 6 s;
# its streams end in-band 2.5 s before) plus time to exit. With a share of the budget instead (5.4 s), a reniced
# gateway on a busy host wrote its error events after Envoy had gone: the client saw the stream cut without them.
GATEWAY_WAVE_S = 7.0


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the supervisor."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="run the whole mesh locally (one process per service)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-moe", help="built-in name, checkpoint directory or HF repo id")
    p.add_argument("--gateway-port", type=int, default=50051, help="port of the public Chat API (default 50051)")
    p.add_argument("--host", default="127.0.0.1", help="interface every service listens on")
    p.add_argument("--status-file", type=Path, default=None, help="default MOEMESH_HOME/run/status.json")
    p.add_argument("--no-auth", action="store_true", help="no API keys: every request is tenant 'default'")
    p.add_argument("--device", default="cpu", help="torch device of the router and expert shards (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--expert-shards", type=int, default=None, help="expert shard processes (default: 2 on CPU; on "
                   "CUDA one per GPU, and 0 with one GPU: experts co-located in the router)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights from the model's config.json (benchmarks without a checkpoint)")
    p.add_argument("--quantization", default="none", choices=("none", "fp8", "int8", "int4"),
                   help="weight-only quantization of the experts (router and shards; MOEMESH_QUANTIZATION)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "packed"),
                   help="CPU weight-only int4/int8 matmuls for the router's dense layers and the expert shards (an "
                   "int4 checkpoint from `moemesh quantize`, else int8): packed (torch's kernels, bf16 activations) "
                   "or onnxruntime (MatMulNBits, int8 activations); MOEMESH_BACKEND")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="fp8: the router's KV cache in e4m3, twice the tokens per byte (MOEMESH_KV_CACHE_DTYPE)")
    data_plane.add_arguments(p)  # --expert-transport, --placement
    up_replicas.add_arguments(p)  # --routers N: data-parallel replicas sharing the shards (M:N)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for SERVING (first run "
                   "converts the built-in model)")
    edge_hook.add_arguments(p)
    supervision.add_arguments(p)
    dashboard_hook.add_arguments(p)
    p.set_defaults(func=run)


def _serving(address: str, service: str) -> bool:
    with grpc_tls.channel(address) as channel:  # mTLS with MOEMESH_MTLS
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                  timeout=2)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(children: dict[str, Child], run_dir: Path, timeout: float, say) -> dict[str, dict]:
    """Ready-file info per service once each is SERVING; raises RuntimeError naming a child that died."""
    ready: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(ready) < len(children):
        for name, child in children.items():
            if name in ready:
                continue
            code = child.exited()
            if code is not None:
                raise RuntimeError(f"{name} exited with code {code} while starting")
            info_path = run_dir / f"{name}.json"
            if info_path.exists():
                info = json.loads(info_path.read_text())
                if _serving(info["address"], SERVICES[name][1]):
                    ready[name] = info
                    say(f"  ok  {name:<10} {info['address']:<22} pid {child.pid:<8} "
                        f"({time.monotonic() - child.started:.1f} s)")
        if time.monotonic() > deadline:
            late = ", ".join(n for n in children if n not in ready)
            raise RuntimeError(f"not SERVING after {timeout:.0f} s: {late}")
        time.sleep(0.1)
    return ready


def _dev_key() -> str | None:
    with contextlib.suppress(OSError):
        return (home.subdir("run") / "dev_api_key").read_text().strip() or None
    return None


def run(ns: argparse.Namespace) -> NoReturn:
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    path = ns.status_file or status_file.default_path()
    running = status_file.read(path)
    if running:
        say(f"moemesh up: a mesh is already running (supervisor pid {running.get('pid')}, gateway "
            f"{running.get('gateway')}); stop it first, or pass another --status-file and --gateway-port")
        exit_now(1)
    if not port_free(ns.host, ns.gateway_port):
        say(f"moemesh up: gateway port {ns.host}:{ns.gateway_port} is in use; pick another with --gateway-port")
        exit_now(1)
    run_dir = home.subdir("run") / f"up-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    children = plan(ns, run_dir)

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    code = 0
    try:
        say(f"moemesh up: model {ns.model!r}, logs in {home.subdir('logs')}")
        note = first_start_note(ns.model)
        if note:
            say(note)
        # Console progress (conversion, loading, waiting) while the services start: moemesh/cli/progress.py.
        with StartProgress({n: c.log_path for n, c in children.items()}, run_dir, say):
            for child in children.values():
                child.start()
            ready = wait_ready(children, run_dir, ns.start_timeout, say)
        if ns.edge:  # Envoy in front of the gateway, once it is SERVING (moemesh/edge/mesh_hook.py)
            ready[edge_hook.NAME] = edge_hook.start(ns, children, ready["gateway"]["address"], run_dir, say)
        dashboard = dashboard_hook.start(ns, path, say)  # live monitoring on threads of this process
        shard_addrs = {n: i["address"] for n, i in ready.items() if n.startswith("expert-")}
        per_router = {r: data_plane.expert_transports(ready[r]["address"], shard_addrs)
                      for r, _ in up_replicas.names(getattr(ns, "routers", 1))}
        transports = per_router["router"]
        say(data_plane.transport_line(getattr(ns, "expert_transport", None), transports, len(shard_addrs)))
        replicas = up_replicas.status(ready, getattr(ns, "routers", 1), per_router)
        for line in up_replicas.lines(replicas):
            say(line)
        write_status(path, ns, children, ready, {**(dashboard or {}), "replicas": replicas}, transports)
        say(f"\nmesh SERVING: gateway {ready['gateway']['address']} (status {path})")
        if dashboard:
            say(f"  dashboard: {dashboard['dashboard']}")
        say('  try: moemesh chat "Hello"' + ("" if path == status_file.default_path() else f" --status-file {path}"))
        say("  stop: Ctrl-C")
        code = supervise(children, ready, ns, path, say)
    except Interrupted as exc:
        say(f"\nmoemesh up: {exc}: stopping")
    except RuntimeError as exc:
        code = 1
        report_failure(children, exc, say)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(children, path, run_dir, say)
    exit_now(code)  # no interpreter teardown: the mesh is down, nothing is left to clean up


def report_failure(children: dict[str, Child], exc: Exception, say) -> None:
    """Why the start failed: the first child that died, with its log tail, and what to do."""
    failed = next((c for c in children.values() if c.exited() not in (None, 0)), None)
    say(f"\nmoemesh up: {exc}")
    if failed is not None:
        say(f"--- last lines of {failed.log_path} ---\n{failed.log_tail()}\n---")
        say("fix the cause above (a port in use? a model that does not load?) and run `moemesh up` again")


def supervise(children: dict[str, Child], ready: dict[str, dict], ns: argparse.Namespace, path: Path, say) -> int:
    """Runs until a signal (Interrupted) or until a service needs more restarts than allowed (returns 1); a service
    that exits or fails its health checks is restarted on its port (moemesh/cli/supervision.py)."""
    def probe(name: str) -> bool:  # same port after a restart: the address in `ready` stays right
        address = ready[name]["address"]
        return _serving(address, SERVICES[name][1]) if name in SERVICES else supervision.tcp_open(address)

    return supervision.watch_until_given_up(children, probe, supervision.policy_from(ns), path, ns.host, say)


def write_status(path: Path, ns: argparse.Namespace, children: dict[str, Child], ready: dict[str, dict],
                 extra: dict | None = None, transports: dict[str, str] | None = None) -> None:
    transports = transports or {}
    services = {
        name: {"name": name, "address": info["address"], "pid": children[name].pid,
               "metrics_port": info.get("metrics_port"), "log": str(children[name].log_path)}
        for name, info in ready.items()
    }
    for name, transport in transports.items():  # expert data plane per shard (shm, gloo, grpc...), Router.Info
        services[name]["transport"] = transport
    status_file.write(path, {
        "gateway": ready["gateway"]["address"], "api_key": None if ns.no_auth else _dev_key(),
        "model": children["gateway"].env["MOEMESH_MODEL"], "pid": os.getpid(), "started": time.time(),
        "services": services, **edge_hook.status_fields(ready), **(extra or {}),
    })


def stop(children: dict[str, Child], path: Path, run_dir: Path, say) -> None:
    start = time.monotonic()
    last = [n for n in children if n.startswith("expert-")] + ["metering"]  # however many shards were started
    waves = [[children[n] for n in wave if n in children and children[n].proc is not None]
             for wave in up_replicas.stop_waves(STOP_WAVES[:-1], children) + [last]]
    for child in waves[0]:  # the gateway wave first, waited for on its own (GATEWAY_WAVE_S); then the rest
        child.terminate()
    for child in waves[0]:
        child.wait(start + GATEWAY_WAVE_S - time.monotonic())
    killed = stop_in_order([w for w in waves if w], budget_s=STOP_BUDGET_S - (time.monotonic() - start))
    with contextlib.suppress(OSError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    for leftover in run_dir.glob("*"):
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
    note = f" (killed: {', '.join(killed)})" if killed else ""
    say(f"moemesh up: stopped in {time.monotonic() - start:.1f} s{note}")
