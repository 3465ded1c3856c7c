"""A lost shard whose experts all have replicas on a live shard is routed around (issue 9, Faults: "or a replica hosts
its experts"), with real shard processes over shared memory and gloo (tiny MoE, both shards host all 4 experts):
the step the SIGKILL lands in fails UNAVAILABLE, the next ones give the in-process engine's logits on the live shard
alone (a process group re-forms without the lost shard), and the restarted shard rejoins the split (and the group).
Without a covering replica the steps keep failing until the shard is back."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from moemesh.errors import ErrorStatus
from moemesh.runtime import placement_plan
from moemesh.runtime.engine import Engine
from services.router.__main__ import build_router
from services.router.expert_client import ExpertCallError
from tests.services.router.test_shm_transport import BLOCK, KV_BLOCKS, PROMPT, Shard, config

EVERYWHERE = [[0, 1, 2, 3], [0, 1, 2, 3]]  # every expert on both shards


@pytest.fixture(scope="module")
def shards(tiny_moe_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("failover-home")
    procs = [Shard(tiny_moe_dir, i, home, experts) for i, experts in enumerate(EVERYWHERE)]
    for shard in procs:
        shard.start()
    yield procs
    for shard in procs:
        shard.stop()


@pytest.fixture(scope="module", params=["shm", "dist"])
def router(request, shards, tiny_moe_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("placement") / "placement.json"
    placement_plan.write(path, EVERYWHERE, 4, "test", {0: [1.0] * 4, 1: [1.0] * 4})
    router = build_router(config(tiny_moe_dir, [s.address for s in shards], expert_transport=request.param,
                                 placement=str(path), stall_timeout=0.5))
    router.kind = {"dist": "gloo"}.get(request.param, request.param)
    yield router
    router.close()


def _logits(router):
    return router.worker.call(router.engine.forward_logits, [PROMPT, PROMPT[:5]])


def _until_ok(router, limit_s: float):
    """The logits of the first call that succeeds within limit_s (UNAVAILABLE meanwhile)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return _logits(router)
        except ExpertCallError as exc:
            assert exc.status is ErrorStatus.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_shard_is_routed_around_then_rejoins(router, shards, tiny_moe_dir):
    want = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK).forward_logits([PROMPT, PROMPT[:5]])
    kind = router.kind
    assert router.dispatch.transports() == [kind, kind]
    _logits(router)
    shards[1].proc.send_signal(signal.SIGKILL)
    shards[1].proc.wait(10)
    got = _until_ok(router, 5)  # the first step after the kill may fail: the shard was mid-step or between
    assert router.dispatch.transports() == [kind, f"{kind}-down"]  # a group re-formed without it
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    shards[1].start()
    deadline = time.monotonic() + 60
    while router.dispatch.transports() != [kind, kind]:  # re-attached at a step once it answers
        assert time.monotonic() < deadline, router.dispatch.transports()
        _logits(router)
        time.sleep(0.2)
    for g, w in zip(_logits(router), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_without_a_covering_replica_the_steps_fail_until_the_shard_is_back(router, shards):
    dispatch = router.dispatch
    assert dispatch.split.without({0, 1}) is None and dispatch.split.without({1}) is not None
    os.kill(shards[0].proc.pid, signal.SIGSTOP)
    os.kill(shards[1].proc.pid, signal.SIGSTOP)
    try:
        for _ in range(2):  # the stalled step, then the re-attach refused: nobody hosts the experts
            with pytest.raises(ExpertCallError) as failed:
                _logits(router)
            assert failed.value.status is ErrorStatus.UNAVAILABLE
    finally:
        os.kill(shards[0].proc.pid, signal.SIGCONT)
        os.kill(shards[1].proc.pid, signal.SIGCONT)
    _until_ok(router, 30)  # the first good step may still run shard 1's experts on shard 0's replica
    deadline = time.monotonic() + 30
    while dispatch.transports() != [router.kind, router.kind]:  # re-attached at a later step once it answers
        assert time.monotonic() < deadline, dispatch.transports()
        _logits(router)
        time.sleep(0.2)
