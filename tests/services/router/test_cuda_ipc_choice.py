"""cuda_ipc selection (CPU): which shards may share the router's GPU, and what the shard refuses, with the reason."""

from __future__ import annotations

import pytest

from moemesh.serving import cuda_ipc, shm_region
from moemesh.v1 import expert_pb2
from services.expert.cuda_ipc_server import refusal as shard_refusal
from services.router import cuda_ipc_dispatch
from services.router.config import RouterConfig


def test_same_gpu_same_host_is_chosen():
    assert cuda_ipc_dispatch.refusal("cuda", [("127.0.0.1:1", "cuda:0"), ("127.0.0.1:2", "cuda:0")],
                                     [True, True]) is None
    assert cuda_ipc_dispatch.refusal("cuda:1", [("a:1", "cuda:1")], [True]) is None


@pytest.mark.parametrize("router, shards, local, reason", [
    ("cpu", [("a:1", "cuda:0")], [True], "not a GPU"),
    ("cuda", [("a:1", "cuda:1")], [True], "computes on cuda:1"),
    ("cuda", [("a:1", "cpu")], [True], "computes on cpu"),
    ("cuda", [("a:1", "cuda:0")], [False], "another host"),
    ("cuda", [], [], "no expert shards"),
])
def test_refusals_name_the_shard_and_why(router, shards, local, reason):
    assert reason in cuda_ipc_dispatch.refusal(router, shards, local)


def _request(**kw) -> expert_pb2.AttachRequest:
    base = dict(max_tokens=64, hidden_size=32, top_k=2, dtype="bfloat16", socket_path="@x",
                host_id=shm_region.host_id(), cuda_ipc=expert_pb2.CudaIpcRegion(device=0, num_layers=4))
    return expert_pb2.AttachRequest(**{**base, **kw})


def test_shard_refusals():
    assert shard_refusal(_request(), "cuda", "bfloat16", 32, (0, 1, 3)) is None
    assert "cuda:1" in shard_refusal(_request(), "cuda:1", "bfloat16", 32, (0,))
    assert "host" in shard_refusal(_request(host_id="elsewhere/1"), "cuda:0", "bfloat16", 32, (0,))
    assert "dtype" in shard_refusal(_request(dtype="float32"), "cuda:0", "bfloat16", 32, (0,))
    assert "hidden_size" in shard_refusal(_request(), "cuda:0", "bfloat16", 64, (0,))
    assert "hosts layer 4" in shard_refusal(_request(), "cuda:0", "bfloat16", 32, (0, 4))


def test_region_layout_puts_flags_after_the_buffers():
    layout = shm_region.Layout(8, 16, 2, "bfloat16")
    flags, total = cuda_ipc.region_bytes(layout, 5)
    assert flags == layout.offsets()[4] and total == flags + 2 * 5 * 4
    assert cuda_ipc.normalize_device("cuda") == "cuda:0" and cuda_ipc.normalize_device("cpu") == "cpu"


def test_transport_flag_accepts_cuda_ipc_and_dummy_weights():
    config = RouterConfig.from_args(["--expert-transport", "cuda_ipc", "--load-format", "dummy"], env={})
    assert (config.expert_transport, config.load_format) == ("cuda_ipc", "dummy")


def _link_over(sock):
    class Client:
        address = "127.0.0.1:1"

    link = cuda_ipc_dispatch.CudaIpcLink(Client(), num_layers=2, hidden_size=8, top_k=2, dtype="bfloat16",
                                         device=None, graphs=False, call_timeout=1.0)
    link._sock = sock
    return link


def test_announce_does_not_wait_and_drain_reports_the_shards_failure():
    import socket

    from services.router.expert_client import ExpertCallError

    router, shard = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = _link_over(router)
    link.announce(64)  # returns although the shard has not answered
    assert shm_region.recv_message(shard)[:3] == (1, cuda_ipc_dispatch.STEP, 64)
    link.drain()  # nothing arrived yet: no wait, no error
    shm_region.send_message(shard, 1, cuda_ipc_dispatch.STEP, 64)
    link.announce(8)
    shm_region.send_message(shard, 2, cuda_ipc_dispatch.STEP, 8, 1, "ValueError: step of 8 rows")
    with pytest.raises(ExpertCallError, match="step of 8 rows"):
        link.drain()
    assert not link.attached
    shard.close()


def test_drain_reports_a_shard_that_exited():
    import socket

    from services.router.expert_client import ExpertCallError

    router, shard = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = _link_over(router)
    link.announce(4)
    shard.close()
    with pytest.raises(ExpertCallError, match="UNAVAILABLE: cuda_ipc: (link error|the shard closed)"):
        link.drain()
