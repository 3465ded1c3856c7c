"""End to end on the real mesh: seven OS processes, real sockets, the tiny MoE (tests in file order: the last one
stops the mesh)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.cli.trace import load_spans, spans_of_request
from moemesh.sdk import ChatClient
from moemesh.sdk.client import build_request
from moemesh.v1 import chat_pb2_grpc

from mesh_harness import ROOT, RunningMesh, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SERVICES = {"gateway": "moemesh.v1.Chat", "tokenizer": "moemesh.v1.Tokenizer", "batcher": "moemesh.v1.Batcher",
            "router": "moemesh.v1.Router", "expert-0": "moemesh.v1.Expert", "expert-1": "moemesh.v1.Expert",
            "metering": "moemesh.v1.Metering"}


def test_every_service_is_serving_and_reflects_its_service(mesh: RunningMesh) -> None:
    assert set(mesh.status["services"]) == set(SERVICES)
    for name, service in SERVICES.items():
        info = mesh.status["services"][name]
        assert info["metrics_port"] > 0 and info["pid"] > 0
        with grpc.insecure_channel(info["address"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for asked in ("", service):
                status = health.Check(health_pb2.HealthCheckRequest(service=asked), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, (name, asked)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                        timeout=10)
            listed = {s.name for r in responses for s in r.list_services_response.service}
            assert service in listed, (name, listed)


def test_chat_unary_and_stream_complete(mesh: RunningMesh) -> None:
    with ChatClient(mesh.gateway, mesh.api_key) as client:
        response = client.complete("Hello", max_tokens=5, temperature=0.0)
        assert response.id.startswith("chatcmpl-") and response.choices[0].finish_reason in ("stop", "length")
        assert response.usage.completion_tokens >= 1 and response.choices[0].message.content
        chunks = list(client.stream("Hello", max_tokens=5, stream_usage=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.total_tokens > 0
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices)


def test_one_trace_spans_all_seven_processes(mesh: RunningMesh) -> None:
    with ChatClient(mesh.gateway, mesh.api_key) as client:
        request_id = client.complete("Trace me", max_tokens=3).id
    deadline = time.monotonic() + 15
    while True:  # each process writes its spans ~0.2 s after they end (later on a busy machine)
        spans = spans_of_request(load_spans(mesh.home / "traces"), request_id)
        services = {s["service"] for s in spans}
        ids = {s["span_id"] for s in spans}
        roots = [s for s in spans if s["parent_id"] not in ids]
        if (services >= set(SERVICES) and len(roots) == 1) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert services == set(SERVICES)
    assert len({s["trace_id"] for s in spans}) == 1
    assert [r["name"] for r in roots] == ["/moemesh.v1.Chat/CreateChatCompletion"]  # one tree, nothing orphaned
    out = subprocess.run([sys.executable, "-m", "moemesh.cli.main", "trace", request_id], env=mesh.env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "7 services" in out.stdout and "expert.step" in out.stdout


def test_invalid_requests_name_the_field_and_gateway_keeps_serving(mesh: RunningMesh) -> None:
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        auth = (("authorization", f"Bearer {mesh.api_key}"),)
        model = mesh.status["model"]
        for request, field in [(build_request("hi", model="nope"), "model"), (build_request([], model=model), "messages"),
                               (build_request("hi", model=model, max_tokens=-3), "max_tokens")]:
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateChatCompletion(request, metadata=auth, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(f"{field}:")
        ok = stub.CreateChatCompletion(build_request("hi", model=model, max_tokens=2), metadata=auth, timeout=60)
        assert ok.usage.completion_tokens >= 1


def test_moemesh_chat_command(mesh: RunningMesh) -> None:
    def chat(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moemesh.cli.main", "chat", "Hello", "--max-tokens", "4",
                               "--status-file", str(mesh.status_path), *args],
                              env=mesh.env(), cwd=ROOT, capture_output=True, text=True, timeout=120)

    as_json = chat("--json")
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["id"].startswith("chatcmpl-") and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] >= 1 and body["model"] == mesh.status["model"]
    content = body["choices"][0]["message"]["content"]
    streamed = chat("--stream")  # greedy by default: the streamed text is the unary answer, delta by delta
    assert streamed.returncode == 0 and streamed.stdout == content + "\n", streamed.stderr
    bad = chat("--api-key", "wrong")
    assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr


def test_sigterm_to_a_gateway_drains_its_stream(mesh: RunningMesh, tmp_path: Path) -> None:
    """A second gateway process on the real mesh (so the mesh's own gateway keeps serving): SIGTERM mid-stream."""
    ready = tmp_path / "gw.json"
    env = {**mesh.env(), "MOEMESH_READY_FILE": str(ready), "OTEL_SERVICE_NAME": "gateway-2",
           "MOEMESH_GATEWAY_GRACE": "60", "MOEMESH_MODEL": mesh.status["model"]}
    for peer in ("tokenizer", "batcher", "metering"):
        env[f"{peer.upper()}_ADDR"] = mesh.status["services"][peer]["address"]
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--port", str(free_port())], env=env, cwd=ROOT,
                            stdout=(tmp_path / "gw.log").open("w"), stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "gw.log").read_text()
            time.sleep(0.1)
        address = json.loads(ready.read_text())["address"]
        chunks: list = []
        first = threading.Event()

        def consume() -> None:
            with ChatClient(address, mesh.api_key) as client:
                for chunk in client.stream("Tell me a long story", max_tokens=25, temperature=0.0):
                    chunks.append(chunk)
                    if chunk.choices and chunk.choices[0].delta.content:
                        first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(120), "no content from the stream"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as info:
            with ChatClient(address, mesh.api_key) as late:
                late.complete("hi", max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        reader.join(120)
        assert not reader.is_alive()
        assert chunks[-1].choices[0].finish_reason == "length"  # the in-flight stream completed
        assert proc.wait(timeout=30) == 0  # and the process exited on its own
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stopping_up_leaves_no_process(mesh: RunningMesh) -> None:
    start = time.monotonic()
    mesh.proc.send_signal(signal.SIGTERM)
    assert mesh.proc.wait(timeout=15) == 0
    assert time.monotonic() - start < 10.5
    time.sleep(0.2)
    alive = [pid for pid in mesh.pids() if _alive(pid)]
    assert not alive, f"left running: {alive}"
    assert not mesh.status_path.exists()
    assert not list((mesh.home / "redis").glob("*.pid")) or not _redis_alive(mesh.home)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _redis_alive(home: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", str(home / "redis")], capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_expert_shards_use_shared_memory_and_the_status_file_says_so(mesh: RunningMesh) -> None:
    assert {mesh.status["services"][n].get("transport") for n in ("expert-0", "expert-1")} == {"shm"}
    assert "expert transport: expert-0 shm, expert-1 shm" in mesh.output_path.read_text()
