"""False positives of the stall deadline (services/router/stall_deadline.py): a live shard process busy in a
2048-token prefill block that takes several stall deadlines, on a host loaded with CPU hogs besides the shard's own
torch threads, is never declared stalled, over shared memory and over gloo (nor by its Expert/Watch stream, NCCL's
liveness), with the router's default deadline. The
block is made long on purpose (a wide expert layer); the link's pace is reset before each block so that it counts
as overdue at once (stall_deadline.BlockPace would otherwise spare it for 2x its expected time) and the shm link is
not told the shard's pid (it would spare a shard whose threads run: stall_deadline.runnable). So only the shard's
beats, sent from a thread of their own while torch computes, keep the step alive: the test fails if they stop or
starve."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from moemesh.builtin.tiny import make_tiny_model
from moemesh.serving import shm_region
from services.router import stall_deadline
from services.router.dist_link import DistGroup
from services.router.expert_client import GrpcShardClient
from services.router.shm_link import ShmLink
from tests.mesh_process import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
HIDDEN, TOKENS, EXPERTS = 256, 2048, 6
DEADLINE = stall_deadline.DEFAULT_S
HOGS = 3  # busy processes beside the shard (2 cores: the shard's 2 torch threads get ~2/5 of the machine)


@pytest.fixture(scope="module")
def wide_moe_dir(tmp_path_factory, builtin_dense_dir) -> Path:
    """One MoE layer of 6 wide experts (H 256, I 4096), top-6: a 2048-token block is ~77 GFLOP on the shard (~1.5 s
    beside the hogs on 2 quiet cores)."""
    return make_tiny_model(tmp_path_factory.mktemp("wide_moe"), hidden=HIDDEN, layers=1, num_experts=EXPERTS,
                           top_k=EXPERTS, moe_intermediate=4096, tokenizer_from=builtin_dense_dir)


@pytest.fixture(scope="module")
def shard(wide_moe_dir, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "MOEMESH_HOME": str(tmp_path_factory.mktemp("busy-home")), "OTEL_SDK_DISABLED": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.expert", "--model", str(wide_moe_dir), "--port", str(port),
         "--shard-index", "0", "--num-shards", "1", "--compute-threads", "2", "--metrics-port", "-1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = GrpcShardClient(f"127.0.0.1:{port}", connect_timeout=60, call_timeout=30)
    client.placement()  # waits until the shard answers
    yield client
    client.close()
    proc.kill()
    proc.wait(10)


def _hog(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


@pytest.fixture
def loaded_host():
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_hog, args=(stop,), daemon=True) for _ in range(HOGS)]
    for hog in hogs:
        hog.start()
    yield
    stop.set()
    for hog in hogs:
        hog.join(10)


def _prefill_block() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)  # [T, H]
    ids = torch.arange(EXPERTS).repeat(TOKENS, 1)  # [T, K]: every token to every expert
    return hidden, ids, torch.full((TOKENS, EXPERTS), 1 / EXPERTS)


def test_a_shm_shard_busy_in_a_long_prefill_block_under_load_is_not_stalled(shard, loaded_host):
    link = ShmLink(shard, hidden_size=HIDDEN, top_k=EXPERTS, dtype="float32", stall_timeout=DEADLINE)
    link.attach(TOKENS)
    link.pid = 0  # no kernel view of the shard: the beats alone must hold
    ages, done = [], threading.Event()  # (monotonic time, age of the shard's latest beat)

    def watch_beats() -> None:  # the oldest beat the router could have seen, sampled every 5 ms
        while not done.wait(0.005):
            now = time.monotonic()
            ages.append((now, now - int(link.region.beats[shm_region.BEAT_TIME_WORD]) / 1e9))

    watcher = threading.Thread(target=watch_beats)
    watcher.start()
    try:
        hidden, ids, weights = _prefill_block()
        took, t0 = [], time.monotonic()
        for seq in (1, 2, 3):
            link.pace.per_token = 0.0  # overdue at once: the beats alone must hold
            start = time.monotonic()
            link.start(seq, 0, hidden, ids, weights)
            out = link.wait(seq, 0, TOKENS)  # raises ExpertCallError("stalled ...") on a false positive
            took.append(time.monotonic() - start)
        assert out.abs().sum() > 0
    finally:
        done.set()
        watcher.join()
        link.close()
    late = [(round(at - t0, 2), round(age, 3)) for at, age in ages if age > 0.1]  # beats 2x late
    print(f"\nshm blocks {', '.join(f'{t:.2f}' for t in took)} s; oldest beat seen {max(a for _, a in ages):.3f} s "
          f"(deadline {DEADLINE} s; load {os.getloadavg()[0]:.1f}); late beats (s into the test, age): {late[:20]}")
    assert max(took) > 1.5 * DEADLINE  # the step outlived the deadline: only the beats kept it alive


def test_a_gloo_shard_busy_in_a_long_prefill_block_under_load_is_not_stalled(shard, loaded_host):
    group = DistGroup([shard], backend="gloo", hidden_size=HIDDEN, top_k=EXPERTS, dtype="float32",
                      stall_timeout=DEADLINE, call_timeout=60, join_timeout=30)
    group.form()
    link, verdicts, done = group.links[0], [], threading.Event()

    def ask_the_watch() -> None:  # as NCCL's polled wait does between polls
        while not done.wait(0.01):
            verdicts.append(group.watch.verdict())

    asker = threading.Thread(target=ask_the_watch)
    asker.start()
    try:
        hidden, ids, weights = _prefill_block()
        took = []
        for seq in (1, 2, 3):
            link.pace.per_token = 0.0  # overdue at once: the beats alone must hold
            start = time.monotonic()
            link.start(seq, 0, hidden, ids, weights)
            out = link.wait(seq, 0, TOKENS)  # the bounded gloo wait times out on a missed beat: "stalled"
            took.append(time.monotonic() - start)
        assert out.abs().sum() > 0 and group.formed
    finally:
        done.set()
        asker.join()
        group.teardown()
    assert len(verdicts) > 50 and not any(verdicts), [v for v in verdicts if v][:3]  # the Watch beat throughout
    print(f"\ngloo blocks {', '.join(f'{t:.2f}' for t in took)} s (deadline {DEADLINE} s; load "
          f"{os.getloadavg()[0]:.1f})")
    assert max(took) > 1.5 * DEADLINE
