"""M:N with real processes: `moemesh up --routers 2` (two router + batcher replicas sharing two expert shards over
shared memory, tiny MoE) beside a single-router mesh. Both replicas answer; their greedy tokens and logprobs equal
the single-router mesh's; the gateway spreads chats over both batchers; each shard counts both routers' tokens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from mesh_harness import ROOT, free_port, wait_status
from moemesh.sdk import ChatClient
from moemesh.v1 import batcher_pb2, batcher_pb2_grpc, common_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PROMPTS = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [500, 600, 700, 800, 12345, 42])


def _up(home: Path, model: Path, routers: int) -> tuple[subprocess.Popen, Path, Path]:
    status_path, output = home / "status.json", home / "up.out"
    env = {**os.environ, "MOEMESH_HOME": str(home)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with output.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli.main", "up", "--model", str(model), "--gateway-port",
             str(free_port()), "--status-file", str(status_path), "--routers", str(routers),
             "--expert-transport", "shm", "--dashboard-port", "-1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, status_path, output


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory, tiny_moe_dir: Path):
    """(M:N status, single-router status), started at the same time."""
    started = [_up(tmp_path_factory.mktemp(f"mn-home-{n}"), tiny_moe_dir, n) for n in (2, 1)]
    try:
        yield [wait_status(proc, status_path, output) for proc, status_path, output in started]
    finally:
        for proc, _, _ in started:
            _stop(proc)


def _greedy(address: str, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    with grpc.insecure_channel(address) as channel:
        request = batcher_pb2.GenerateRequest(
            request_id=f"mn-{address}-{prompt[0]}", tenant="default", model=model, prompt_ids=prompt,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True))
        events = list(batcher_pb2_grpc.BatcherStub(channel).Generate(request, timeout=120))
    return [t for e in events for t in e.token_ids], [lp.logprob for e in events for lp in e.logprobs]


def _metric(status: dict, service: str, pattern: str) -> float:
    """Sum of the samples of `service`'s /metrics whose line matches `pattern`."""
    port = status["services"][service]["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(pattern, line))


def test_status_lists_both_replicas_on_shared_memory(meshes):
    mn, single = meshes
    assert [(r["router"], r["batcher"]) for r in mn["replicas"]] == [("router", "batcher"), ("router-1", "batcher-1")]
    for replica in mn["replicas"]:
        assert replica["transports"] == {"expert-0": "shm", "expert-1": "shm"}
        assert replica["batcher_address"] == mn["services"][replica["batcher"]]["address"]
    assert len(single["replicas"]) == 1 and "router-1" not in single["services"]


def test_both_replicas_answer_like_a_single_router_mesh(meshes):
    mn, single = meshes
    for prompt in PROMPTS:
        want_tokens, want_logprobs = _greedy(single["services"]["batcher"]["address"], single["model"], prompt)
        assert len(want_tokens) == 8
        for replica in mn["replicas"]:
            tokens, logprobs = _greedy(replica["batcher_address"], mn["model"], prompt)
            assert tokens == want_tokens, replica["batcher"]
            assert logprobs == pytest.approx(want_logprobs, abs=1e-4), replica["batcher"]


def test_gateway_spreads_chats_and_shards_see_both_routers(meshes):
    mn, single = meshes
    ok = r'moemesh_batcher_request_success_total\{'
    before = {r["batcher"]: _metric(mn, r["batcher"], ok) for r in mn["replicas"]}

    def chat(status: dict) -> str:
        client = ChatClient(status["gateway"], status["api_key"], model=status["model"], timeout=120)
        try:
            return client.complete("Name a colour.", max_tokens=6, temperature=0).choices[0].message.content
        finally:
            client.close()

    want = chat(single)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: chat(mn), range(4)))
    assert answers == [want] * 4
    served = {b: _metric(mn, b, ok) - n for b, n in before.items()}
    assert all(n >= 1 for n in served.values()), served  # least outstanding: both batchers got chats
    routers = [str(mn["services"][r["router"]]["pid"]) for r in mn["replicas"]]
    for shard in ("expert-0", "expert-1"):
        for pid in routers:
            tokens = _metric(mn, shard, rf'moemesh_expert_router_tokens_total\{{router="{pid}"\}}')
            assert tokens > 0, (shard, pid)
