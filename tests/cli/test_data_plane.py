"""`moemesh up`'s data-plane defaults: thread counts per compute service, user env wins, nothing for the others."""

from __future__ import annotations

import os

from moemesh.cli.data_plane import thread_env


def test_router_gets_every_core_and_shards_share_them_passively():
    cores = os.cpu_count() or 1
    assert thread_env("ROUTER", 2, {}) == {"MOEMESH_ROUTER_COMPUTE_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_env("EXPERT", 2, {})["MOEMESH_EXPERT_COMPUTE_THREADS"] == str(max(1, cores // 2))
    assert thread_env("BATCHER", 2, {}) == {}


def test_values_in_the_environment_win():
    env = {"MOEMESH_EXPERT_COMPUTE_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert thread_env("EXPERT", 2, env) == {}
