"""Metering on the whole mesh (`moemesh up` on the tiny MoE, its embedded Redis, real sockets; one mesh per module):
the dev tenant and key lookup of `moemesh chat`, quotas through the gateway, tenant isolation of the account API,
cost of goods against the engine's busy time, the usage report and its plot, and a metering crash losing nothing."""

from __future__ import annotations

import json
import signal
import ssl
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from moemesh.sdk import ChatClient
from moemesh.v1 import chat_pb2, chat_pb2_grpc
from services.metering.plot import COMPLETION, COST, PROMPT
from services.metering.pricing import DEFAULT_CACHED_DISCOUNT, HardwareTable

from mesh_harness import RunningMesh, free_port
from metering_harness import (
    Account, ChatLoad, alive, cli, create_tenant, ledger_ids, metric_sum, read_png, side_gateway, side_metering,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MESH_UP_ARGS = ["--edge", "--edge-port", "0"]  # Envoy in front (conftest.py): the account API over HTTPS too
PRICE_PER_TOKEN_USD = 0.001 / 1000  # metering's default price table


def _chat(mesh: RunningMesh, api_key: str, text: str = "Hello", max_tokens: int = 3, gateway: str | None = None):
    with ChatClient(gateway or mesh.gateway, api_key, model=mesh.status["model"], timeout=120) as client:
        return client.complete(text, max_tokens=max_tokens, temperature=0.0)


def test_up_keeps_a_default_tenant_whose_key_chat_finds(mesh: RunningMesh) -> None:
    with Account(mesh.gateway, mesh.api_key) as me:
        assert me.usage().tenant == "default"
    chat = ("chat", "Hi", "--max-tokens", "2", "--status-file", str(mesh.status_path), "--json")
    code, out, err = cli(mesh.home, *chat)  # no flag, no env: the status file's api_key
    assert code == 0, err
    assert json.loads(out)["usage"]["completion_tokens"] >= 1
    code, _, err = cli(mesh.home, *chat, env={"MOEMESH_API_KEY": "mm-wrong"})  # env beats the status file
    assert code == 1 and "UNAUTHENTICATED" in err
    code, _, err = cli(mesh.home, *chat, "--api-key", mesh.api_key, env={"MOEMESH_API_KEY": "mm-wrong"})
    assert code == 0, err  # the flag beats env


def test_over_quota_chats_are_resource_exhausted_with_retry_after_until_set_quota(mesh: RunningMesh) -> None:
    key = create_tenant(mesh, "rpm2", "--rpm", "2")
    for _ in range(2):
        assert _chat(mesh, key).usage.completion_tokens >= 1  # within quota
    for stream in (False, True):
        with pytest.raises(grpc.RpcError) as refused:
            with ChatClient(mesh.gateway, key, model=mesh.status["model"]) as client:
                if stream:
                    list(client.stream("Hello", max_tokens=3))
                else:
                    client.complete("Hello", max_tokens=3)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per minute limit 2" in refused.value.details()
        retry_ms = int(dict(refused.value.trailing_metadata())["retry-after-ms"])
        assert 0 < retry_ms <= 60_000
    code, out, err = cli(mesh.home, "tenants", "set-quota", "rpm2", "--rpm", "10", "--json")
    assert code == 0 and json.loads(out)["rpm"] == 10, err
    assert _chat(mesh, key).usage.completion_tokens >= 1  # at once, no restart


def test_reserve_holds_the_effective_max_tokens(mesh: RunningMesh) -> None:
    """A request without max_tokens reserves the gateway's default (256): too large for a 200 tokens/minute tenant,
    and no retry can help (no retry-after-ms)."""
    key = create_tenant(mesh, "tpm200", "--tpm", "200")
    with ChatClient(mesh.gateway, key, model=mesh.status["model"]) as client, pytest.raises(grpc.RpcError) as big:
        client.complete("Hello")
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max completion 256" in big.value.details()
    assert "retry-after-ms" not in dict(big.value.trailing_metadata())
    assert _chat(mesh, key, max_tokens=3).usage.completion_tokens >= 1


def test_a_tenant_cannot_read_or_rate_another_tenants_usage(mesh: RunningMesh) -> None:
    key_a, key_b = create_tenant(mesh, "tenant-a"), create_tenant(mesh, "tenant-b")
    b_request = _chat(mesh, key_b).id
    with Account(mesh.gateway, key_a) as a, Account(mesh.gateway, key_b) as b:
        for call in (lambda: a.usage("tenant-b"), lambda: a.feedback(b_request, rating=1),
                     lambda: a.feedback("chatcmpl-unknown", rating=1)):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert b.feedback(b_request, rating=4, task_completed=True, comment="fine").request_id == b_request
        with pytest.raises(grpc.RpcError) as bad:
            b.feedback(b_request, rating=9)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rating" in bad.value.details()
        own = b.usage()
        assert (own.tenant, own.requests, own.rated_requests, own.satisfaction) == ("tenant-b", 1, 1, 4.0)
        assert own.task_completion_rate == 1.0 and a.usage().requests == 0
    with Account(mesh.gateway, "mm-not-a-key") as nobody, pytest.raises(grpc.RpcError) as unknown:
        nobody.usage()
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _https(mesh: RunningMesh, key: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one call to the edge's OpenAI-style HTTP API."""
    request = urllib.request.Request(
        mesh.status["edge_https"] + path, data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    context = ssl.create_default_context(cafile=mesh.status["ca_cert"])
    try:
        with urllib.request.urlopen(request, context=context, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_feedback_usage_and_quota_over_http_at_the_edge(mesh: RunningMesh) -> None:
    key_c, key_d = create_tenant(mesh, "http-c", "--rpm", "2"), create_tenant(mesh, "http-d")
    chat = {"model": mesh.status["model"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, body, _ = _https(mesh, key_c, "/v1/chat/completions", chat)
    assert status == 200, body
    rated = {"request_id": body["id"], "rating": 5, "task_completed": True, "comment": "spot on"}
    status, denied, _ = _https(mesh, key_d, "/v1/feedback", rated)
    assert (status, denied["error"]["code"]) == (403, "PERMISSION_DENIED")
    status, denied, _ = _https(mesh, key_d, "/v1/usage?tenant=http-c")
    assert (status, denied["error"]["code"]) == (403, "PERMISSION_DENIED")
    status, stored, _ = _https(mesh, key_c, "/v1/feedback", rated)
    assert status == 200 and stored["request_id"] == body["id"] and stored["recorded_unix"] > 0
    status, usage, _ = _https(mesh, key_c, f"/v1/usage?since_unix={int(time.time()) - 3600}")
    assert status == 200 and (usage["tenant"], usage["requests"], usage["satisfaction"]) == ("http-c", 1, 5)
    assert usage["completion_tokens"] == body["usage"]["completion_tokens"] and usage["cost_usd"] > 0
    assert _https(mesh, key_c, "/v1/chat/completions", chat)[0] == 200
    status, refused, headers = _https(mesh, key_c, "/v1/chat/completions", chat)  # the third in a minute
    assert (status, refused["error"]["type"]) == (429, "rate_limit_exceeded")
    assert int(headers["retry-after"]) >= 1


def test_cost_of_goods_adds_up_to_engine_busy_time_times_hardware_price(mesh: RunningMesh) -> None:
    """Engine busy time is the router's own figure (sum of its step compute times, Prometheus), independent of the
    batcher's split of each step over its sequences that the ledger's costs come from."""
    key = create_tenant(mesh, "cogs")
    router, batcher = (mesh.status["services"][n]["metrics_port"] for n in ("router", "batcher"))
    busy_before = metric_sum(router, "moemesh_router_step_seconds_sum")
    batcher_before = metric_sum(batcher, "moemesh_batcher_router_busy_seconds_total")
    prompts = [f"Tell me about the number {i}. " * (1 + i % 4) for i in range(12)]  # prefill of different sizes
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: _chat(mesh, key, p, max_tokens=6), prompts))
    with Account(mesh.gateway, key) as me:
        report = me.wait_requests(len(prompts))
    busy = metric_sum(router, "moemesh_router_step_seconds_sum") - busy_before
    batcher_busy = metric_sum(batcher, "moemesh_batcher_router_busy_seconds_total") - batcher_before
    usd_per_hour = HardwareTable().get("cpu:shared").usd_per_hour  # metering's default --hardware, 1 device
    print(f"\n{len(prompts)} concurrent chats: engine busy {busy:.4f} s (batcher {batcher_busy:.4f} s), ledger "
          f"engine {report.engine_seconds:.4f} s, cost ${report.cost_usd:.10f} vs ${busy * usd_per_hour / 3600:.10f}")
    assert report.requests == len(prompts)
    assert report.completion_tokens == sum(a.usage.completion_tokens for a in answers)
    assert busy > 0 and batcher_busy == pytest.approx(busy, rel=1e-6)
    assert report.engine_seconds == pytest.approx(busy, rel=0.01)
    assert report.cost_usd == pytest.approx(busy * usd_per_hour / 3600, rel=0.01)


def test_usage_command_json_totals_and_plot(mesh: RunningMesh, tmp_path: Path) -> None:
    def totals() -> dict:
        code, out, err = cli(mesh.home, "usage", "--tenant", "default", "--json")
        assert code == 0, err
        return json.loads(out)

    with Account(mesh.gateway, mesh.api_key) as me:
        before = me.usage()  # earlier tests' commits landed long ago
        answers = [_chat(mesh, mesh.api_key, f"Count to {i}", max_tokens=4) for i in range(3)]
        after_report = me.wait_requests(before.requests + 3)
    after = totals()
    prompt = sum(a.usage.prompt_tokens for a in answers)
    completion = sum(a.usage.completion_tokens for a in answers)
    assert after["requests"] - before.requests == 3
    assert after["prompt_tokens"] - before.prompt_tokens == prompt
    assert after["completion_tokens"] - before.completion_tokens == completion
    # Repeated chat-template prefixes hit the prefix cache: cached prompt tokens pay a quarter of the input price.
    cached = sum(a.usage.prompt_tokens_details.cached_tokens for a in answers)
    billed = prompt - cached + cached * (1 - DEFAULT_CACHED_DISCOUNT) + completion
    assert after["price_usd"] - before.price_usd == pytest.approx(billed * PRICE_PER_TOKEN_USD)
    assert after["cost_usd"] > before.cost_usd
    assert (after["requests"], after["price_usd"], after["cost_usd"]) == pytest.approx(
        (after_report.requests, after_report.price_usd, after_report.cost_usd))  # CLI == the gateway's GetUsage

    png = tmp_path / "usage.png"
    code, _, err = cli(mesh.home, "usage", "--tenant", "default", "--plot", str(png))
    assert code == 0 and f"wrote {png}" in err, err
    width, height, rows = read_png(png)
    colours = {bytes(row[x:x + 3]) for row in rows for x in range(0, len(row), 3)}
    assert (width, height) == (1000, 700)
    assert {bytes(PROMPT), bytes(COMPLETION), bytes(COST)} <= colours  # token bars and the cost series are drawn


@pytest.mark.timeout(300)
def test_sigkill_and_restart_of_metering_loses_no_committed_record(mesh: RunningMesh, tmp_path: Path) -> None:
    """Its own metering (fixed port, own Redis) and a second gateway on the mesh's tokenizer and batcher; clients
    chat throughout; metering is SIGKILLed while a chat is generating and restarted once chats are refused. Every
    chat a client saw complete is in the ledger exactly once (the gateway retries commits while metering is away;
    commits are idempotent); refused chats (Reserve failed: nothing ran) are not."""
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    metering = side_metering(home, port).start()
    gateway = side_gateway(mesh, home, f"127.0.0.1:{port}").start()
    key = (home / "run" / "dev_api_key").read_text().strip()
    try:
        with ChatLoad(gateway.info["address"], key, mesh.status["model"]) as load:
            wait_for(lambda: len(load.done) >= 6, 120, "first chats")
            redis_pid = json.loads((home / "redis" / "owner.json").read_text())["server_pid"]
            killed_at, refused_before, completed_while_down = _kill_during_a_chat(metering, gateway, key, mesh, load)
            wait_for(lambda: not alive(redis_pid), 15, "the embedded redis-server to die with metering")
            wait_for(lambda: len(load.refused) > refused_before, 120, "a chat refused while metering is down")
            metering.start()
            wait_for(lambda: len(load.done) >= killed_at + 6, 120, "chats after the restart")
        records = ledger_ids(f"127.0.0.1:{port}", "default", len(load.done))
        print(f"\n{len(load.done)} chats completed ({killed_at} before the kill, >= {completed_while_down} while "
              f"metering was down), {len(load.refused)} refused: {sorted({c.name for c in load.refused})}; "
              f"ledger {len(records)} records")
        assert sorted(records) == sorted(load.done)
        assert set(load.refused) <= {grpc.StatusCode.UNAVAILABLE}
    finally:
        gateway.stop()
        metering.stop()


def _kill_during_a_chat(metering, gateway, key: str, mesh: RunningMesh, load: ChatLoad) -> tuple[int, int, int]:
    """SIGKILLs metering once a streamed chat is admitted and generating, then lets that chat finish (its commit has
    to wait for metering). Returns (chats done before the kill, refusals before the kill, chats done since)."""
    with ChatClient(gateway.info["address"], key, model=mesh.status["model"], timeout=120) as chat:
        for chunk in chat.stream("Tell me a story", max_tokens=12):
            if metering.proc.poll() is None:
                metering.proc.send_signal(signal.SIGKILL)
                metering.proc.wait(10)
                killed_at, refused_before = len(load.done), len(load.refused)
    load.done.append(chunk.id)
    return killed_at, refused_before, len(load.done) - killed_at


def test_account_rpcs_are_plain_grpc_on_the_chat_service(mesh: RunningMesh) -> None:
    """Missing key: UNAUTHENTICATED, like every Chat call; the request still needs an id."""
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetUsage(chat_pb2.UsageQuery(), timeout=30)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Account(mesh.gateway, mesh.api_key) as me, pytest.raises(grpc.RpcError) as empty:
        me.feedback("", rating=3)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and empty.value.details().startswith("request_id:")
