"""A forced --expert-transport never falls back to gRPC, with real processes: a dist router whose rendezvous the
shards cannot reach exits within its join timeout naming the shards and the address; a shm shard that comes back
refusing shared memory fails the steps naming the shard and the transport (auto falls back to grpc instead)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from services.router.__main__ import build_router
from services.router.expert_client import ExpertCallError
from tests.mesh_process import free_port
from tests.services.router.test_shm_transport import PROMPT, ROOT, Shard, config

UNREACHABLE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): routed nowhere


class DtypeShard(Shard):
    """A shard process whose dtype can change across restarts (same port)."""

    dtype = "float32"

    def env(self) -> dict[str, str]:
        return {**super().env(), "MOEMESH_EXPERT_DTYPE": self.dtype}


@pytest.fixture(scope="module")
def shards(tiny_moe_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("forced-home")
    procs = [DtypeShard(tiny_moe_dir, i, home) for i in (0, 1)]
    for shard in procs:
        shard.start()
    yield procs
    for shard in procs:
        shard.stop()


def test_unreachable_rendezvous_fails_the_router_start_naming_shards_and_address(shards, tiny_moe_dir, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "services.router", "--model", str(tiny_moe_dir), "--port", str(port),
            "--metrics-port", "-1", "--kv-blocks", "64", "--expert-addrs", ",".join(s.address for s in shards),
            "--expert-transport", "dist", "--dist-host", UNREACHABLE, "--join-timeout", "2", "--connect-timeout", "60"]
    start = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, "MOEMESH_HOME": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    err = done.stderr
    assert all(s.address in err for s in shards) and f"rendezvous {UNREACHABLE}:" in err, err[-3000:]
    assert "--expert-transport dist" in err and "No fallback to grpc" in err, err[-3000:]
    # The shards' start-up wait (up to 60 s here) aside, the group gives up after --join-timeout 2 s.
    assert time.monotonic() - start < 45, err[-3000:]


def _steps(router, n: int = 40) -> ExpertCallError | None:
    """Steps until one succeeds (None) or n attempts failed (the last error)."""
    error = None
    for _ in range(n):
        try:
            router.worker.call(router.engine.forward_logits, [PROMPT])
            return None
        except ExpertCallError as exc:
            error = exc
            time.sleep(0.3)
    return error


@pytest.mark.slow
def test_forced_shm_never_falls_back_on_reattach(shards, tiny_moe_dir):
    forced = build_router(config(tiny_moe_dir, [s.address for s in shards], expert_transport="shm"))
    auto = build_router(config(tiny_moe_dir, [s.address for s in shards]))
    try:
        assert _steps(forced, 1) is None and forced.dispatch.transports() == ["shm", "shm"]
        shards[1].stop()
        shards[1].dtype = "bfloat16"  # back on its port, but shared memory now refuses the router's float32
        shards[1].start()
        error = _steps(forced)
        assert error is not None and shards[1].address in str(error) and "transport shm" in str(error)
        assert "No fallback to grpc" in str(error) and "dtype" in str(error)
        assert forced.dispatch.transports() == ["shm", "shm-down"]
        _steps(auto)  # auto: the same refusal falls back to grpc (and the mixed dtypes fail on Forward)
        assert auto.dispatch.transports() == ["shm", "grpc"]
    finally:
        forced.close()
        auto.close()
        shards[1].stop()
        shards[1].dtype = "float32"
        shards[1].start()
