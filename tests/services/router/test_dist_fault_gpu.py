"""NCCL faults on two real GPUs: the router (rank 0, cuda:0, this process) and one expert shard process (rank 1,
cuda:1). A SIGKILLed shard fails the block within 1 s (the Watch stream breaks; the group is aborted, no kernel left
waiting) and a SIGSTOPped one within the stall deadline + 1 s, with this process alive (NCCL's own error handling
must not take the router down); the group re-forms when the shard is back. Skips without two GPUs: NCCL puts one
rank per GPU. Run: `.venv/bin/pytest -q tests/services/router/test_dist_fault_gpu.py` on a 2-GPU machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch

from services.router.dist_link import DistGroup
from services.router.expert_client import ExpertCallError, GrpcShardClient
from tests.mesh_process import free_port
from tests.services.router.test_cuda_ipc_gpu import CONFIG, _wait_ready

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL: one rank per GPU)")
STALL_S = 1.0


class _GpuShard:
    def __init__(self, model_dir, log) -> None:
        self.port, self.model_dir, self.log = free_port(), model_dir, log
        self.client = GrpcShardClient(f"127.0.0.1:{self.port}", connect_timeout=120)
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, "MOEMESH_MODEL": str(self.model_dir), "MOEMESH_EXPERT_PORT": str(self.port),
               "MOEMESH_EXPERT_DEVICE": "cuda:1", "MOEMESH_EXPERT_DTYPE": "bfloat16",
               "MOEMESH_EXPERT_LOAD_FORMAT": "dummy", "MOEMESH_EXPERT_NUM_SHARDS": "1",
               "MOEMESH_EXPERT_SHARD_INDEX": "0", "OTEL_SDK_DISABLED": "true"}
        self.proc = subprocess.Popen([sys.executable, "-m", "services.expert"], env=env, stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT)
        _wait_ready(self.client, self.proc, self.log)


def _block(group: DistGroup, seq: int) -> float:
    """One layer-0 block of 5 tokens on the group; its wall seconds."""
    hidden = torch.randn(5, CONFIG["hidden_size"], dtype=torch.bfloat16, device="cuda:0")
    ids = torch.randint(0, CONFIG["num_experts"], (5, CONFIG["num_experts_per_tok"]), device="cuda:0")
    weights = torch.rand(5, CONFIG["num_experts_per_tok"], device="cuda:0")
    start, link = time.monotonic(), group.links[0]
    link.start(seq, 0, hidden, ids, weights)
    out = link.wait(seq, 0, 5)
    assert out.shape == (5, CONFIG["hidden_size"]) and torch.isfinite(out.float()).all()
    return time.monotonic() - start


def _fails_within(group: DistGroup, seq: int, limit_s: float) -> str:
    start = time.monotonic()
    with pytest.raises(ExpertCallError) as failed:
        _block(group, seq)
    took = time.monotonic() - start
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and took < limit_s, (took, str(failed.value))
    return str(failed.value)


def test_nccl_block_fails_fast_on_a_killed_or_stopped_shard_and_the_group_reforms(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    shard = _GpuShard(tmp_path, tmp_path / "expert.log")
    shard.start()
    group = DistGroup([shard.client], backend="nccl", hidden_size=CONFIG["hidden_size"],
                      top_k=CONFIG["num_experts_per_tok"], dtype="bfloat16", device="cuda:0",
                      stall_timeout=STALL_S, call_timeout=30, join_timeout=60)
    try:
        group.form()
        _block(group, 1)  # NCCL connects on the first block
        shard.proc.send_signal(signal.SIGKILL)
        assert "control channel lost" in _fails_within(group, 2, 1.0) and group.broken
        shard.proc.wait(10)
        shard.start()
        group.form()  # a new formation with the new shard process
        _block(group, 3)
        os.kill(shard.proc.pid, signal.SIGSTOP)
        try:
            assert "stalled" in _fails_within(group, 4, STALL_S + 1.0)
        finally:
            os.kill(shard.proc.pid, signal.SIGCONT)
        group.form()
        _block(group, 5)
    finally:
        group.teardown()
        shard.client.close()
        if shard.proc.poll() is None:
            shard.proc.terminate()
            shard.proc.wait(10)
