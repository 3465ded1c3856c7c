"""The edge's transport: TLS 1.3 only, native gRPC through Envoy, health without a key, active health checks of the
gateway, the local rate limit, mTLS to the gateway, and access logs (real Envoy, real sockets)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge_clients import ca_cert, http_client
from edge_fake_chat import GOOD_KEY, FakeGateway
from moemesh.certs import ensure_peer
from moemesh.certs.grpc_tls import server_credentials
from moemesh.edge import launch
from moemesh.v1 import chat_pb2, chat_pb2_grpc, common_pb2

AUTH = (("authorization", f"Bearer {GOOD_KEY}"),)
REQUEST = chat_pb2.ChatCompletionRequest(model="tiny", messages=[common_pb2.ChatMessage(role="user", content="hi")])


def _s_client(port: int, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version, "-alpn", "h2,http/1.1"],
                          input=b"", capture_output=True, timeout=20)


def test_tls12_is_refused_and_tls13_negotiates_h2(edge) -> None:
    assert shutil.which("openssl"), "this check needs the openssl command (Debian package openssl)"
    old = _s_client(edge.port, "-tls1_2")
    assert old.returncode != 0 and b"alert protocol version" in old.stdout + old.stderr
    new = _s_client(edge.port, "-tls1_3")
    out = new.stdout.decode()
    assert new.returncode == 0 and "TLSv1.3" in out and "ALPN protocol: h2" in out


def _channel(edge, home) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(open(ca_cert(home), "rb").read())
    return grpc.secure_channel(f"127.0.0.1:{edge.port}", creds)


def test_native_grpc_passes_through_with_its_key(edge, edge_home) -> None:
    with _channel(edge, edge_home) as channel:
        chat = chat_pb2_grpc.ChatStub(channel)
        assert chat.CreateChatCompletion(REQUEST, metadata=AUTH, timeout=10).choices[0].message.content == "echo: hi"
        texts = [c.choices[0].delta.content for c in chat.StreamChatCompletion(REQUEST, metadata=AUTH, timeout=10)
                 if c.choices]
        assert "".join(texts) == "echo: hi"
        with pytest.raises(grpc.RpcError) as err:
            chat.CreateChatCompletion(REQUEST, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_only_chat_and_health_are_reachable(edge, edge_home) -> None:
    with _channel(edge, edge_home) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="moemesh.v1.Chat"),
                                                            timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with http_client(edge_home) as client:
        assert client.get(f"{edge.url}/healthz").status_code == 200


def test_access_log_has_request_id_and_tls_version(edge, edge_home) -> None:
    with http_client(edge_home) as client:
        response = client.get(f"{edge.url}/v1/models", headers={"authorization": f"Bearer {GOOD_KEY}"})
    request_id = response.headers["x-request-id"]
    log = edge_home / "logs" / "edge-access.log"
    deadline = time.monotonic() + 10  # Envoy flushes access logs about once a second
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in log.read_text().splitlines() if request_id in line]
        if lines:
            break
        time.sleep(0.2)
    assert lines, f"request {request_id} not in {log}"
    assert lines[0]["tls"] == "TLSv1.3" and lines[0]["status"] == 200 and lines[0]["rpc"] == "/moemesh.v1.Chat/ListModels"
    assert "good-key" not in log.read_text()  # keys are not logged


def test_an_unhealthy_gateway_is_taken_out_and_back(edge_home) -> None:
    gateway = FakeGateway()
    edge = launch([gateway.address], port=0, health_interval_s=0.2)
    try:
        with http_client(edge_home) as client:
            assert client.get(f"{edge.url}/healthz").status_code == 200
            gateway.set_serving(False)
            _until(lambda: client.get(f"{edge.url}/healthz").status_code == 503)
            response = client.post(f"{edge.url}/v1/chat/completions", json={"model": "tiny", "messages": []},
                                   headers={"authorization": f"Bearer {GOOD_KEY}"})
            assert response.status_code == 503 and response.json()["error"]["code"] == "UNAVAILABLE"
            gateway.set_serving(True)
            _until(lambda: client.get(f"{edge.url}/healthz").status_code == 200)
    finally:
        edge.stop()
        gateway.stop()


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_local_rate_limit_answers_429_and_resource_exhausted(edge_home, fake_gateway) -> None:
    edge = launch([fake_gateway.address], port=0, rate_limit_rps=1, rate_limit_burst=2)
    try:
        with http_client(edge_home) as client:
            codes = [client.get(f"{edge.url}/v1/models", headers={"authorization": f"Bearer {GOOD_KEY}"})
                     for _ in range(4)]
        limited = codes[-1]
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        with _channel(edge, edge_home) as channel, pytest.raises(grpc.RpcError) as err:
            chat_pb2_grpc.ChatStub(channel).ListModels(chat_pb2.ListModelsRequest(), metadata=AUTH, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        edge.stop()


def test_mtls_to_the_gateway_is_a_config_option(edge_home) -> None:
    gateway = FakeGateway(server_credentials(ensure_peer("gateway")))
    edge = launch([gateway.address], port=0, mtls=True)
    try:
        with _channel(edge, edge_home) as channel:
            reply = chat_pb2_grpc.ChatStub(channel).CreateChatCompletion(REQUEST, metadata=AUTH, timeout=10)
        assert reply.choices[0].message.content == "echo: hi"
        # Without a client certificate the gateway refuses the connection.
        anonymous = grpc.ssl_channel_credentials(open(ca_cert(edge_home), "rb").read())
        options = (("grpc.ssl_target_name_override", "gateway"),)
        with grpc.secure_channel(gateway.address, anonymous, options) as channel, pytest.raises(grpc.RpcError):
            chat_pb2_grpc.ChatStub(channel).ListModels(chat_pb2.ListModelsRequest(), metadata=AUTH, timeout=5)
    finally:
        edge.stop()
        gateway.stop()


def test_streams_have_no_route_timeout_but_an_idle_timeout(edge_home, fake_gateway) -> None:
    edge = launch([fake_gateway.address], port=0, request_timeout_s=1.0, stream_idle_timeout_s=1.0)
    auth = {"authorization": f"Bearer {GOOD_KEY}"}

    def ask(content: str, stream: bool):
        body = {"model": "tiny", "stream": stream, "messages": [{"role": "user", "content": content}]}
        return client.post(f"{edge.url}/v1/chat/completions", json=body, headers=auth)

    try:
        with http_client(edge_home) as client:
            slow_unary = ask("sleep 1.5", stream=False)
            assert slow_unary.status_code == 504 and slow_unary.json()["error"]["code"] == "DEADLINE_EXCEEDED"
            long_stream = ask("drip 6 0.4", stream=True)  # 2.4 s in all, never 1 s without a byte
            assert long_stream.status_code == 200 and long_stream.text.endswith("data: [DONE]\n\n")
            idle_stream = ask("sleep 1.5", stream=True)
            assert idle_stream.status_code == 504, idle_stream.text
    finally:
        edge.stop()


def test_envoy_dies_with_the_process_that_started_it(edge_home, fake_gateway) -> None:
    assert shutil.which("setpriv"), "Envoy's parent-death signal needs setpriv (Debian package util-linux)"
    script = ("import sys, time; from moemesh.edge import launch; "
              f"edge = launch([{fake_gateway.address!r}], port=0); print(edge.child.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "MOEMESH_HOME": str(edge_home)})
    envoy_pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no cleanup code runs in the parent
    parent.wait()
    _until(lambda: not _alive(envoy_pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"
