"""Hostile input at scale: thousands of generated hostile requests (tests/edge/hostile_cases.py, hostile_grpc.py)
against the real mesh behind Envoy, HTTP and gRPC over TLS. After every case a valid request on the same protocol
must still succeed; at the end every process of the mesh must still be alive.

Counts per category and outcome (rejected / accepted / reset / server_fault / unnamed / not_rejected /
cross_tenant_leak), the number of 5xx answers (HTTP 5xx, gRPC INTERNAL/UNKNOWN/UNAVAILABLE/DATA_LOSS), failed valid
requests, dead processes. A second tenant ("victim") makes one chat first; the attacker's cases include its request
id and name (feedback, usage), and any answer holding its request id counts as a cross-tenant leak.

    .venv/bin/python benchmarks/hostile.py [--http 5000] [--grpc 5000] [--valid-every 10] [--status-file ...]
Writes benchmarks/results/hostile.json and .md (machine, command); exit code 1 when any case failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

from edge_bench_mesh import ROOT, edge_mesh, machine
from hostile_cases import Victim, http_cases
from hostile_grpc import grpc_cases, valid_request
from hostile_run import Probe
from moemesh.v1 import chat_pb2, common_pb2


def make_victim(mesh, probe: Probe) -> Victim:
    """Tenant "victim" (moemesh tenants, on the mesh's Redis) and one request of it through the edge."""
    env = {**os.environ, "MOEMESH_HOME": str(mesh.home)}
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "tenants", "create", "victim", "--json"],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    key = json.loads(out.stdout)["api_key"]
    marker = f"victim-secret-{os.urandom(8).hex()}"
    auth = (("authorization", f"Bearer {key}"),)
    chat = probe._channel.unary_unary("/moemesh.v1.Chat/CreateChatCompletion",
                                      request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=chat_pb2.ChatCompletion.FromString)
    request = valid_request(mesh.model, messages=[common_pb2.ChatMessage(role="user", content=marker)])
    answer = chat(request, metadata=auth, timeout=120)
    feedback = probe._channel.unary_unary("/moemesh.v1.Chat/SubmitFeedback",
                                          request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=chat_pb2.SubmitFeedbackResponse.FromString)
    feedback(chat_pb2.SubmitFeedbackRequest(request_id=answer.id, rating=4, comment=marker), metadata=auth,
             timeout=30)
    return Victim("victim", answer.id, key, marker)


def run_cases(probe: Probe, strategy, send, valid, count: int, seed: int, valid_every: int = 1) -> dict:
    """`count` generated cases, each followed by a valid request; returns counters."""
    stats = Counter()

    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case) -> None:
        verdict = send(case)
        stats["cases"] += 1
        stats["5xx"] += verdict.outcome == "server_fault"
        stats["leaks"] += verdict.outcome == "cross_tenant_leak"
        if stats["cases"] % valid_every:
            return
        try:
            ok = valid()
        except Exception:  # noqa: BLE001 (any failure of the valid request counts)
            ok = False
        stats["valid_ok" if ok else "valid_failed"] += 1

    from hypothesis import seed as hseed

    hseed(seed)(one)()
    return dict(stats)


def markdown(result: dict) -> str:
    lines = [f"# Hostile input against the edge ({result['cases']} cases)", "",
             f"Command: `{result['command']}`  ", f"Machine: {json.dumps(result['machine'])}  ",
             f"Duration: {result['seconds']:.0f} s", "",
             f"- 5xx answers (HTTP 5xx, gRPC INTERNAL/UNKNOWN/UNAVAILABLE/DATA_LOSS): **{result['5xx']}**",
             f"- answers holding another tenant's data: **{result['leaks']}**",
             f"- cases judged wrong (5xx, not rejected, error not naming the problem): **{result['failures']}**",
             f"- valid requests after every {result['valid_every']} cases: {result['valid_ok']} ok, "
             f"**{result['valid_failed']}** failed",
             f"- processes dead afterwards: **{len(result['dead'])}** {result['dead'] or ''}", "",
             "| category | outcome | cases |", "|---|---|---|"]
    for row in result["tally"]:
        lines.append(f"| {row['kind']} | {row['outcome']} | {row['count']} |")
    if result["failure_samples"]:
        lines += ["", "Failures (first 20):", ""] + [f"- {f}" for f in result["failure_samples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http", type=int, default=5000, help="generated HTTP cases")
    p.add_argument("--grpc", type=int, default=5000, help="generated gRPC cases")
    p.add_argument("--valid-every", type=int, default=10, help="a valid request (both protocols) after every N cases")
    p.add_argument("--seed", type=int, default=20261128)
    p.add_argument("--status-file", type=Path, help="a running mesh with --edge (default: start one, tiny MoE)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile")
    ns = p.parse_args(argv)
    start = time.monotonic()
    with edge_mesh(ns.status_file, "--edge-rps", "5000") as mesh:
        probe = Probe(mesh.url, mesh.ca_cert, mesh.model, mesh.api_key)
        victim = make_victim(mesh, probe)
        probe.secrets = victim.secrets()
        http = run_cases(probe, http_cases(mesh.model, mesh.api_key, victim), probe.http, probe.valid_http, ns.http,
                         ns.seed, ns.valid_every)
        grpc = run_cases(probe, grpc_cases(mesh.model, mesh.api_key, victim), probe.grpc, probe.valid_grpc, ns.grpc,
                         ns.seed + 1, ns.valid_every)
        dead = [name for name, alive in mesh.alive().items() if not alive]
        if ns.status_file is None and mesh.proc.poll() is not None:
            dead.append("supervisor")
        probe.close()
    total = Counter(http) + Counter(grpc)
    result = {
        "cases": total["cases"], "http_cases": http.get("cases", 0), "grpc_cases": grpc.get("cases", 0),
        "5xx": total["5xx"], "leaks": total["leaks"], "valid_every": ns.valid_every,
        "failures": len(probe.failures), "valid_ok": total["valid_ok"],
        "valid_failed": total["valid_failed"], "dead": dead, "seconds": time.monotonic() - start,
        "tally": [{"kind": k, "outcome": o, "count": n} for (k, o), n in sorted(probe.tally.items())],
        "failure_samples": [f"{v.kind} {v.outcome}: {v.detail}" for v in probe.failures[:20]],
        "machine": machine(),
        "command": "python benchmarks/hostile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    clean = not (result["5xx"] or result["leaks"] or result["failures"] or result["valid_failed"] or dead)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
