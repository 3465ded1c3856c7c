"""Liveness of process-group shards through Expert/Watch, with real shard processes (tiny MoE): a SIGKILLed shard is
named lost at once, a SIGSTOPped one after the stall deadline and live again after SIGCONT; a polled wait (NCCL's way:
the step's works never complete when a peer is gone) fails within 1 s of the kill; a shard whose router's watch
ends leaves that formation (NCCL: aborts it, so no kernel waits for a router that is gone)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest
import torch

from moemesh.serving import dist_wire, serve_in_process
from services.expert import servicer as expert_servicer
from services.expert.__main__ import build_servicer
from services.expert.config import ExpertConfig
from services.router.dist_link import DistGroup
from services.router.expert_client import ExpertCallError, GrpcShardClient
from services.router.shard_watch import GroupWatch
from tests.services.router.test_shm_transport import Shard

STALL_S = 1.0  # the router's default: beats every 0.25 s survive a loaded 2-core machine


@pytest.fixture(scope="module")
def shards(tiny_moe_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("watch-home")
    procs = [Shard(tiny_moe_dir, i, home) for i in (0, 1)]
    for shard in procs:
        shard.start()
    clients = [GrpcShardClient(s.address, connect_timeout=60) for s in procs]
    for client in clients:
        client.placement()  # waits until the shard answers
    yield procs, clients
    for client in clients:
        client.close()
    for shard in procs:
        shard.stop()


def _until(predicate, limit_s: float):
    """(seconds until predicate() returned something true, its value); fails after limit_s."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        value = predicate()
        if value:
            return time.monotonic() - start, value
        time.sleep(0.01)
    raise AssertionError(f"not within {limit_s} s")


class _NeverDone:
    """A work whose peer never answers: what an NCCL receive from a dead or stopped shard is to the router (CPU
    torch has no NCCL, and gloo's point-to-point works only complete inside a blocking wait)."""

    def is_completed(self) -> bool:
        return False

    def wait(self, timeout=None) -> None:
        raise AssertionError("wait_polled waited on a work that never completed")


def test_a_stopped_shard_is_stalled_after_the_deadline_and_live_after_sigcont(shards):
    procs, clients = shards
    watch = GroupWatch(clients, "g-stop", STALL_S)
    try:
        time.sleep(STALL_S * 2)
        assert watch.verdict() is None  # both beat, also past the first deadline
        os.kill(procs[1].proc.pid, signal.SIGSTOP)
        try:
            took, (address, why) = _until(watch.verdict, 5)
            assert address == procs[1].address and why.startswith("stalled") and took < STALL_S + 1
        finally:
            os.kill(procs[1].proc.pid, signal.SIGCONT)
        _until(lambda: watch.verdict() is None, 5)
    finally:
        watch.close()


def test_a_polled_wait_fails_within_a_second_of_a_sigkill_then_the_shard_watches_again(shards):
    procs, clients = shards
    watch = GroupWatch(clients, "g-kill", STALL_S * 4)  # a long stall deadline: the broken stream must be what fails
    failed: list[tuple[float, str]] = []

    def fault() -> str | None:
        lost = watch.verdict()
        return lost and f"{lost[0]} {lost[1]}"

    def waiter() -> None:
        try:
            dist_wire.wait_polled(_NeverDone(), fault)
        except RuntimeError as exc:
            failed.append((time.monotonic(), str(exc)))

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        time.sleep(0.3)
        killed = time.monotonic()
        procs[0].proc.send_signal(signal.SIGKILL)
        thread.join(5)
        assert failed and failed[0][0] - killed < 1.0, failed
        assert failed[0][1].startswith(procs[0].address) and "control channel lost" in failed[0][1]
    finally:
        watch.close()
        thread.join(5)
    procs[0].proc.wait(10)
    procs[0].start()
    clients[0].placement()
    watch = GroupWatch(clients, "g-back", STALL_S)
    try:
        time.sleep(STALL_S * 2)
        assert watch.verdict() is None
    finally:
        watch.close()


async def test_the_shard_leaves_the_group_when_the_routers_watch_ends(tiny_moe_dir):
    servicer = build_servicer(ExpertConfig(model=str(tiny_moe_dir), shard_index=0, num_shards=1))
    async with serve_in_process(lambda s: expert_servicer.add_to_server(servicer, s), name="e0") as e:
        client = GrpcShardClient(e.address, call_timeout=5)
        await asyncio.to_thread(client.placement)
        group = DistGroup([client], backend="gloo", hidden_size=64, top_k=2, dtype="float32", stall_timeout=1.0,
                          call_timeout=5, join_timeout=30)
        await asyncio.to_thread(group.form)
        hidden, ids, weights = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.rand(3, 2)
        link = group.links[0]
        link.start(1, 0, hidden, ids, weights)
        await asyncio.to_thread(link.wait, 1, 0, 3)  # the group works
        group.watch.close()  # as when the router drops a formation: the shard leaves it
        member = servicer._dist._members[-1]
        deadline = time.monotonic() + 5
        while member.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not member.alive  # (NCCL: also aborted; gloo: ends when the router's sockets close, next)
        await asyncio.to_thread(group.form)  # the router re-forms: a new membership serves
        assert servicer._dist._members[-1] is not member and servicer._dist._members[-1].alive
        link.start(2, 0, hidden, ids, weights)
        await asyncio.to_thread(link.wait, 2, 0, 3)
        group.teardown()
        client.close()
    await servicer.close()


def test_a_polled_group_aborts_within_a_second_of_a_sigkill_and_names_the_shard(shards):
    """The router's NCCL wait path (polled works, the watch, abort) over gloo: gloo's works never report completion
    to a poll, as an NCCL receive from a dead peer never does, so only the watch can end the wait."""
    procs, clients = shards
    group = DistGroup(clients, backend="gloo", hidden_size=64, top_k=2, dtype="float32", stall_timeout=2.0,
                      call_timeout=30, join_timeout=30)
    group.polled = True
    group.form()
    try:
        hidden, ids, weights = torch.randn(3, 64), torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.rand(3, 2)
        for link in group.links:
            link.start(1, 0, hidden, ids, weights)
        procs[1].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        errors = []
        for link in group.links:  # as ShmDispatch.collect: every started link is waited for
            with pytest.raises(ExpertCallError) as failed:
                link.wait(1, 0, 3)
            errors.append((time.monotonic() - killed, failed.value))
        assert all(took < 1.0 and e.code == grpc.StatusCode.UNAVAILABLE for took, e in errors), errors
        assert procs[1].address in group.aborted and "control channel lost" in group.aborted
        assert not group.formed and all(not link.attached for link in group.links)
    finally:
        group.teardown()
        procs[1].proc.wait(10)
        procs[1].start()
        clients[1].placement()
