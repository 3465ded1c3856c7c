"""Multi-host, on one machine: the expert shard in one network namespace, router + batcher + tokenizer + gateway in
another, joined by a veth pair (tests/e2e/netns_harness.py). The router reaches the shard at its veth address, which
is not local to it, so `--expert-transport auto` picks torch.distributed (gloo) and every MoE layer's data crosses the
veth; a chat through the gateway must come back, and Router.Info must say gloo for that shard. Needs root or
CAP_NET_ADMIN (CI runs as root): without it the test fails saying so."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mesh_harness import ROOT
from netns_harness import TwoHosts, wait_ready
from moemesh.serving.server import READY_FILE_ENV

PORTS = {"expert": 21050, "tokenizer": 21052, "batcher": 21053, "router": 21054, "gateway": 21051}  # fresh stacks
MODULES = {"expert": "services.expert", "tokenizer": "services.tokenizer", "router": "services.router",
           "batcher": "services.batcher", "gateway": "gateway"}
INFO = """
import json, sys, grpc
from moemesh.v1 import router_pb2, router_pb2_grpc
info = router_pb2_grpc.RouterStub(grpc.insecure_channel(sys.argv[1])).Info(router_pb2.RouterInfoRequest(), timeout=30)
print(json.dumps({p.address: p.transport for p in info.placement}))
"""


def _env(hosts: TwoHosts, home: Path, model: Path) -> dict[str, str]:
    env = {**os.environ, "MOEMESH_HOME": str(home), "MOEMESH_MODEL": str(model), "PYTHONUNBUFFERED": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "MOEMESH_GATEWAY_AUTH": "false", "METERING_ADDR": "",
           "EXPERT_ADDRS": f"{hosts.shard_ip}:{PORTS['expert']}",
           **{f"{n.upper()}_ADDR": f"127.0.0.1:{PORTS[n]}" for n in ("tokenizer", "batcher", "router", "gateway")}}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return env


def _start(hosts: TwoHosts, env: dict[str, str], home: Path) -> dict[str, Path]:
    """Every service with its ready file; the shard listens on its veth address, the others on 127.0.0.1."""
    ready, logs, procs = {}, {}, {}
    for name, module in MODULES.items():
        kind = name.upper()
        ready[name], logs[name] = home / f"{name}.ready", home / f"{name}.log"
        service_env = {**env, READY_FILE_ENV: str(ready[name]), f"MOEMESH_{kind}_PORT": str(PORTS[name]),
                       f"MOEMESH_{kind}_METRICS_PORT": "-1", f"MOEMESH_{kind}_COMPUTE_THREADS": "1",
                       f"MOEMESH_{kind}_HOST": hosts.shard_ip if name == "expert" else "127.0.0.1"}
        ns = hosts.shard_ns if name == "expert" else hosts.router_ns
        procs[name] = hosts.start(ns, [sys.executable, "-m", module], service_env, logs[name], ROOT)
    wait_ready(ready, procs, logs, timeout_s=240)
    return logs


@pytest.mark.slow
def test_chat_crosses_the_veth_through_a_gloo_data_plane(tiny_moe_dir, tmp_path):
    hosts = TwoHosts()
    try:
        hosts.create()
        env = _env(hosts, tmp_path, tiny_moe_dir)
        logs = _start(hosts, env, tmp_path)
        probe = hosts.run(hosts.router_ns, [sys.executable, "-c", INFO, f"127.0.0.1:{PORTS['router']}"], env, 60, ROOT)
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert json.loads(probe.stdout) == {f"{hosts.shard_ip}:{PORTS['expert']}": "gloo"}
        chat = hosts.run(hosts.router_ns, [sys.executable, "-m", "moemesh.cli.main", "chat", "Hello there",
                                           "--endpoint", f"127.0.0.1:{PORTS['gateway']}", "--max-tokens", "6",
                                           "--json"], {**env, "MOEMESH_API_KEY": "none"}, 120, ROOT)
        assert chat.returncode == 0, chat.stderr[-3000:] + logs["router"].read_text()[-3000:]
        reply = json.loads(chat.stdout)
        assert reply["usage"]["completion_tokens"] == 6, reply  # the tiny random model never says EOS this early
        shard_log = logs["expert"].read_text()
        assert "joined gloo group" in shard_log and f"rendezvous {hosts.router_ip}:" in shard_log, shard_log[-3000:]
    finally:
        hosts.remove()
