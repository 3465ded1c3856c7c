"""The shared-memory expert data plane with real shard processes (tiny MoE): the logits of the in-process engine,
the transport in Router.Info, a SIGKILLed or SIGSTOPped shard failing the step quickly with UNAVAILABLE and the router
re-attaching when the shard is back, Attach refusals falling back to gRPC, and shards of mixed dtypes refused."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from moemesh.errors import ErrorStatus
from moemesh.runtime.engine import Engine
from moemesh.serving import client_channel, serve_in_process, shm_region
from moemesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from services.expert import servicer as expert_servicer
from services.expert.__main__ import build_servicer
from services.expert.config import ExpertConfig
from services.router.__main__ import build_router
from services.router.config import RouterConfig
from services.router.expert_client import ExpertCallError
from services.router.placement import PlacementError
from services.router.servicer import add_to_server
from tests.mesh_process import free_port

ROOT = Path(__file__).resolve().parents[3]
KV_BLOCKS, BLOCK = 64, 16
PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28, 198, 4161, 2]


class Shard:
    """One `python -m services.expert` process (shard `index` of 2) on a fixed port (restartable at the same
    address); `experts`: the --experts it hosts (default: its half), `args`: more flags (e.g. --placement)."""

    def __init__(self, model_dir: Path, index: int, home: Path, experts: list[int] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.model_dir, self.index, self.home = model_dir, index, home
        listed = ("--experts", ",".join(map(str, experts))) if experts is not None else ()
        self.args = (*listed, *args)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "MOEMESH_HOME": str(self.home), "OMP_WAIT_POLICY": "PASSIVE"}

    def start(self) -> Shard:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.expert", "--model", str(self.model_dir), "--port", str(self.port),
             "--shard-index", str(self.index), "--num-shards", "2", "--compute-threads", "1", "--metrics-port", "-1",
             *self.args], cwd=ROOT, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def shards(tiny_moe_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("shm-home")
    procs = [Shard(tiny_moe_dir, i, home) for i in (0, 1)]
    for shard in procs:
        shard.start()
    yield procs
    for shard in procs:
        shard.stop()


def config(model_dir, addrs, **kw) -> RouterConfig:
    return RouterConfig(model=str(model_dir), expert_addrs=tuple(addrs), port=0, metrics_port=-1, kv_blocks=KV_BLOCKS,
                        block_size=BLOCK, connect_timeout=60, expert_timeout=10, **kw)


@pytest.fixture(scope="module")
def router(shards, tiny_moe_dir):
    router = build_router(config(tiny_moe_dir, [s.address for s in shards], stall_timeout=0.5))
    yield router
    router.close()


def test_shm_logits_equal_the_in_process_engine(router, tiny_moe_dir):
    assert router.dispatch.transports() == ["shm", "shm"]
    local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
    # 11 tokens, then 330 tokens: more than the first region's 256 rows, so both links grow (re-attach) on the way.
    for batch in ([PROMPT], [PROMPT * 30, PROMPT[:3]]):
        remote = router.worker.call(router.engine.forward_logits, batch)
        for got, want in zip(remote, local.forward_logits(batch)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert router.dispatch.transports() == ["shm", "shm"] and router.dispatch._links[0].max_tokens == 512


async def test_router_info_shows_the_transport_per_shard(router, shards, tiny_moe_dir):
    async with serve_in_process(lambda s: add_to_server(router.servicer, s), name="router") as r:
        channel = client_channel(r.address)  # held: a channel nobody references is closed
        info = await router_pb2_grpc.RouterStub(channel).Info(router_pb2.RouterInfoRequest())
    assert [(p.address, p.transport) for p in info.placement] == [(s.address, "shm") for s in shards]
    grpc_router = await asyncio.to_thread(build_router, config(tiny_moe_dir, [s.address for s in shards],
                                                               expert_transport="grpc"))
    try:
        assert grpc_router.dispatch.transports() == ["grpc", "grpc"]
    finally:
        grpc_router.close()


def _step_until_ok(router, deadline_s: float) -> float:
    """Seconds until a forward through every shard succeeds again (ExpertCallError until then)."""
    start = time.monotonic()
    while True:
        try:
            router.worker.call(router.engine.forward_logits, [PROMPT])
            return time.monotonic() - start
        except ExpertCallError:
            assert time.monotonic() - start < deadline_s, "the router did not re-attach the shard"
            time.sleep(0.2)


async def test_sigkilled_shard_fails_the_step_fast_and_is_reattached(router, shards):
    async with serve_in_process(lambda s: add_to_server(router.servicer, s), name="router") as r:
        channel = client_channel(r.address)
        stub = router_pb2_grpc.RouterStub(channel)
        work = router_pb2.SequenceWork(seq_id="a", token_ids=PROMPT, position=0, sample=True)
        await stub.Step(router_pb2.StepRequest(work=[work]))
        shards[1].proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            nxt = router_pb2.SequenceWork(seq_id="a", token_ids=[5], position=len(PROMPT), sample=True)
            for _ in range(3):  # the kill lands between steps or during one
                await stub.Step(router_pb2.StepRequest(work=[nxt]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and shards[1].address in info.value.details()
        assert time.monotonic() - start < 1.0
        state = await stub.Info(router_pb2.RouterInfoRequest())
        assert state.placement[1].transport == "shm-down"
    shards[1].proc.wait(10)
    shards[1].start()
    assert await asyncio.to_thread(_step_until_ok, router, 60) < 60
    assert router.dispatch.transports() == ["shm", "shm"]


def test_stopped_shard_fails_within_the_stall_timeout_then_recovers(router, shards):
    os.kill(shards[0].proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(ExpertCallError, match="stalled: no heartbeat") as info:
            router.worker.call(router.engine.forward_logits, [PROMPT])
        assert info.value.status is ErrorStatus.UNAVAILABLE and time.monotonic() - start < 2.0  # stall_timeout 0.5 s
    finally:
        os.kill(shards[0].proc.pid, signal.SIGCONT)
    assert _step_until_ok(router, 30) < 30


async def test_attach_refusal_names_the_reason(tiny_moe_dir):
    servicer = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=0, num_shards=2))
    async with serve_in_process(lambda s: expert_servicer.add_to_server(servicer, s), name="e0") as e:
        channel = client_channel(e.address)
        stub = expert_pb2_grpc.ExpertStub(channel)
        request = expert_pb2.AttachRequest(shm_path="/dev/shm/none", max_tokens=8, hidden_size=64, top_k=2,
                                           dtype="float32", socket_path="@none", host_id="elsewhere/boot")
        reply = await stub.Attach(request)
        assert not reply.ok and "the router runs on host 'elsewhere/boot'" in reply.reason
        request.host_id, request.hidden_size = shm_region.host_id(), 576
        reply = await stub.Attach(request)
        assert not reply.ok and "hidden_size 576 is not this shard's model's 64" in reply.reason
    await servicer.close()


async def test_shards_of_different_dtypes_refuse_to_start(tiny_moe_dir):
    first = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=0, num_shards=2))
    other = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=1, num_shards=2, dtype="bfloat16"))
    async with serve_in_process(lambda s: expert_servicer.add_to_server(first, s), name="e0") as a, \
            serve_in_process(lambda s: expert_servicer.add_to_server(other, s), name="e1") as b:
        with pytest.raises(PlacementError, match=r"different dtypes: .*float32 \(experts 0-1\); .*bfloat16 "
                                                 r"\(experts 2-3\)"):
            await asyncio.to_thread(build_router, config(tiny_moe_dir, [a.address, b.address]))
