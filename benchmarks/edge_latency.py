"""Added latency of the public edge: one chat completion (1 greedy token) through Envoy + gateway, against a direct
router call doing the same model work (prefill of the same prompt ids, sample one token).

Paths, measured round-robin per iteration on the real mesh (`moemesh up --edge`, tiny MoE unless --status-file):
    router        Router.Step (prefill + 1 token) straight to the router (plaintext gRPC); Release outside the timer
    gateway       Chat.CreateChatCompletion straight to the gateway (plaintext gRPC): + metering, tokenizer, batcher
    edge_grpc     the same through Envoy (TLS 1.3, native gRPC)
    edge_http     POST /v1/chat/completions through Envoy (TLS 1.3, HTTP/1.1 keep-alive, JSON transcoding, Lua)
Added latency = per-iteration difference to `router` (p50, p95), and edge_http - gateway (Envoy's own share).

    .venv/bin/python benchmarks/edge_latency.py [--requests 200] [--status-file ~/.moemesh/run/status.json]
Writes benchmarks/results/edge_latency.json and .md (machine, command).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx2

from edge_bench_mesh import ROOT, EdgeMesh, edge_mesh, machine
from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2
from moemesh.v1 import tokenizer_pb2_grpc

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
PATHS = ("router", "gateway", "edge_grpc", "edge_http")


class Paths:
    def __init__(self, mesh: EdgeMesh) -> None:
        s, self.mesh = mesh.status, mesh
        self.model, self.auth = s["model"], (("authorization", f"Bearer {mesh.api_key}"),)
        self.router = router_pb2_grpc.RouterStub(grpc.insecure_channel(s["services"]["router"]["address"]))
        self.gateway = chat_pb2_grpc.ChatStub(grpc.insecure_channel(s["gateway"]))
        creds = grpc.ssl_channel_credentials(Path(mesh.ca_cert).read_bytes())
        self.edge = chat_pb2_grpc.ChatStub(grpc.secure_channel(mesh.url.removeprefix("https://"), creds))
        self.http = httpx2.Client(verify=mesh.ca_cert, timeout=60)
        tokenizer = tokenizer_pb2_grpc.TokenizerStub(grpc.insecure_channel(s["services"]["tokenizer"]["address"]))
        chat = tokenizer_pb2.ChatInput(add_generation_prompt=True,
                                       messages=[common_pb2.ChatMessage(**m) for m in PROMPT])
        self.prompt_ids = list(tokenizer.Encode(tokenizer_pb2.EncodeRequest(model=self.model, chat=chat)).ids)
        self.request = chat_pb2.ChatCompletionRequest(model=self.model, max_tokens=1, temperature=0,
                                                      messages=[common_pb2.ChatMessage(**m) for m in PROMPT])
        self.body = {"model": self.model, "messages": PROMPT, "max_tokens": 1, "temperature": 0}
        self.step = 1 << 40

    def call(self, path: str) -> float:
        """Seconds one call of `path` took."""
        if path == "router":
            self.step += 1
            seq = f"edge-bench-{self.step}"
            work = router_pb2.SequenceWork(seq_id=seq, token_ids=self.prompt_ids, position=0, sample=True,
                                           sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1))
            start = time.perf_counter()
            self.router.Step(router_pb2.StepRequest(step_id=self.step, work=[work]), timeout=60)
            elapsed = time.perf_counter() - start
            self.router.Release(router_pb2.ReleaseRequest(seq_ids=[seq]), timeout=60)
            return elapsed
        start = time.perf_counter()
        if path == "gateway":
            self.gateway.CreateChatCompletion(self.request, metadata=self.auth, timeout=60)
        elif path == "edge_grpc":
            self.edge.CreateChatCompletion(self.request, metadata=self.auth, timeout=60)
        else:
            response = self.http.post(f"{self.mesh.url}/v1/chat/completions", json=self.body,
                                      headers={"authorization": f"Bearer {self.mesh.api_key}"})
            response.raise_for_status()
        return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(samples: dict[str, list[float]]) -> dict:
    rows = {p: {"p50_ms": 1e3 * pct(v, 0.5), "p95_ms": 1e3 * pct(v, 0.95), "mean_ms": 1e3 * statistics.mean(v)}
            for p, v in samples.items()}
    added = {}
    for path, over in (("gateway", "router"), ("edge_grpc", "router"), ("edge_http", "router"),
                       ("edge_grpc", "gateway"), ("edge_http", "gateway")):
        diffs = [a - b for a, b in zip(samples[path], samples[over])]
        added[f"{path} - {over}"] = {"p50_ms": 1e3 * pct(diffs, 0.5), "p95_ms": 1e3 * pct(diffs, 0.95)}
    return {"latency": rows, "added": added}


def markdown(result: dict) -> str:
    lines = [f"# Edge latency ({result['requests']} requests per path, 1 greedy token, tiny MoE)", "",
             f"Command: `{result['command']}`  ", f"Machine: {json.dumps(result['machine'])}", "",
             "| path | p50 ms | p95 ms | mean ms |", "|---|---|---|---|"]
    for path, row in result["latency"].items():
        lines.append(f"| {path} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['mean_ms']:.1f} |")
    lines += ["", "| added latency (paired per iteration) | p50 ms | p95 ms |", "|---|---|---|"]
    for name, row in result["added"].items():
        lines.append(f"| {name} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="measured calls per path")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--status-file", type=Path, help="a running mesh with --edge (default: start one, tiny MoE)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "edge_latency")
    ns = p.parse_args(argv)
    with edge_mesh(ns.status_file) as mesh:
        paths = Paths(mesh)
        for _ in range(ns.warmup):
            for path in PATHS:
                paths.call(path)
        samples: dict[str, list[float]] = {path: [] for path in PATHS}
        for _ in range(ns.requests):
            for path in PATHS:
                samples[path].append(paths.call(path))
    result = {"requests": ns.requests, "prompt_tokens": len(paths.prompt_ids), "machine": machine(),
              "command": "python benchmarks/edge_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **summarize(samples)}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    ns.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
