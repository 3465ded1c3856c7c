"""`moemesh bench` against a real `moemesh up` (tiny MoE, Envoy edge in front): over gRPC to the gateway with the
status file's defaults, and over OpenAI HTTP through the edge; ignore_eos makes every request run to max_tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mesh_harness import ROOT, RunningMesh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MESH_UP_ARGS = ["--edge", "--edge-port", "0"]
LOAD = ["--concurrency", "2", "--requests", "4", "--prompt-tokens", "16", "--max-tokens", "4", "--ignore-eos",
        "--json", "--no-progress"]


def bench(mesh: RunningMesh, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "bench", "--status-file", str(mesh.status_path),
                          *LOAD, *args], cwd=ROOT, env=mesh.env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout)


def check(doc: dict) -> None:
    assert (doc["completed"], doc["failed"]) == (4, 0), doc["errors"]
    assert doc["output_tokens"] == 16  # the server's usage: 4 each, end-of-sequence ignored
    assert doc["prompt_tokens_mean"] > 16 and doc["output_tokens_per_s"] > 0
    for name in ("ttft_ms", "e2e_ms"):
        assert 0 < doc[name]["p50"] <= doc[name]["p99"]
    assert doc["ttft_ms"]["p50"] < doc["e2e_ms"]["p50"] and doc["itl_ms"]["mean"] is not None


def test_bench_over_grpc_with_the_status_files_endpoint_and_key(mesh: RunningMesh) -> None:
    doc = bench(mesh)
    check(doc)
    assert (doc["mode"], doc["target"], doc["model"]) == ("grpc", mesh.gateway, mesh.status["model"])


def test_bench_over_openai_http_through_the_edge(mesh: RunningMesh) -> None:
    doc = bench(mesh, "--endpoint", mesh.status["edge_https"], "--ca", mesh.status["ca_cert"])
    check(doc)
    assert doc["mode"] == "openai-http" and doc["target"].startswith("https://")
