"""`moemesh up`'s data-plane defaults: thread counts per compute service, user env wins, nothing for the others."""

from __future__ import annotations

import os

from moemesh.cli.data_plane import thread_env


def test_shards_share_the_cores_and_the_router_keeps_a_share_passively():
    cores = os.cpu_count() or 1
    assert thread_env("ROUTER", 2, {}) == {"MOEMESH_ROUTER_COMPUTE_THREADS": str(max(1, cores // 3)),
                                           "OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_env("ROUTER", 0, {})["MOEMESH_ROUTER_COMPUTE_THREADS"] == str(cores)  # experts in the router
    assert thread_env("EXPERT", 2, {})["MOEMESH_EXPERT_COMPUTE_THREADS"] == str(max(1, cores // 2))
    assert thread_env("BATCHER", 2, {}) == {}


def test_values_in_the_environment_win():
    env = {"MOEMESH_EXPERT_COMPUTE_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert thread_env("EXPERT", 2, env) == {}


def test_the_front_end_runs_at_lower_priority_than_the_data_plane(tmp_path):
    import sys

    import pytest

    from moemesh.cli.data_plane import FRONTEND_NICE, nice_of
    from moemesh.serving.supervisor import Child

    assert [nice_of(n, {}) for n in ("gateway", "tokenizer", "metering")] == [FRONTEND_NICE] * 3
    assert [nice_of(n, {"MOEMESH_FRONTEND_NICE": "10"}) for n in ("router", "batcher", "expert-0")] == [0, 0, 0]
    assert nice_of("gateway", {"MOEMESH_FRONTEND_NICE": "10"}) == 10
    with pytest.raises(ValueError, match="MOEMESH_FRONTEND_NICE: 'x'"):
        nice_of("gateway", {"MOEMESH_FRONTEND_NICE": "x"})
    child = Child("gateway", [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ),
                  tmp_path / "gateway.log", nice=nice_of("gateway", {"MOEMESH_FRONTEND_NICE": "10"}))
    child.start()
    try:  # the child's niceness is ours plus the increment
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    finally:
        child.proc.kill()
        child.proc.wait()
