"""torch.distributed expert data plane between a router (rank 0) and expert shards (ranks 1..N), shared by both ends.

The group is formed per JoinGroup (protos/moemesh/v1/expert.proto): the router creates a TCPStore, every member
builds a ProcessGroupGloo / ProcessGroupNCCL object on it directly (not torch.distributed's global default group, so
a process can drop a failed group and form a new one without restarting). Per MoE layer and shard, three messages:

    router -> shard  tag REQUEST_HEAD  header [8] int64  (kind LAYER, seq, layer, T, 0, ...)
    router -> shard  tag REQUEST_BODY  uint8 [T*H*es + T*K*4 + T*K*4]  hidden [T, H] | ids [T, K] int32 |
                                                                        weights [T, K] float32, packed
    shard -> router  tag REPLY         uint8 [64 + T*H*es]  header [8] int64 (kind REPLY, seq, layer, T, status,
                                                            text bytes) | output [T, H] (status != 0: error text)

On the first layer of a router step a gloo request head may carry, in word 5, the length of the step's trace
context ("k=v" lines, as over shared memory); the router then sends those bytes on tag CONTEXT after the body, and
the shard joins its "expert.step" span to the trace.

Every message has a size both ends know (from T, or the fixed header), as NCCL requires. While a block computes, a
gloo shard also sends bare 64-byte (kind BEAT, seq) headers on REPLY every heartbeat_ms (gloo accepts a message
shorter than the posted receive), so the router's bounded wait tells a long block from a stalled shard. A dead peer
closes its TCP connections: the pending gloo operation fails at once. A gloo wait that times out closes the pair,
so any failure ends the group.

NCCL has neither: a receive from a dead or stopped peer spins on the GPU, and a blocking wait that times out aborts
and (TORCH_NCCL_ASYNC_ERROR_HANDLING's default) takes the process down. So NCCL groups are formed with error handling
"clean up only" and an op timeout of a week (an idle mesh is not a fault); both ends poll their works (wait_polled),
asking the router's liveness watch of every shard (services/router/shard_watch.py, Expert/Watch) between polls, and
abort the group (ncclCommAbort) when it names a lost shard.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

HEAD_WORDS = 8
LAYER, REPLY, BEAT = 1, 2, 3  # header[0]: the message kind
REQUEST_HEAD, REQUEST_BODY, REPLY, CONTEXT = 0, 1, 2, 3  # tags
HEAD_BYTES = HEAD_WORDS * 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("gloo", "nccl")
NCCL_OP_TIMEOUT_S = 7 * 24 * 3600.0  # liveness is the watch's job: NCCL's own watchdog must not end an idle group
SPIN_POLLS = 200  # wait_polled: first polls only yield the GIL (a reply is usually microseconds away) ...
POLL_S = 0.0002  # ... then sleep this long between polls


def body_bytes(tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes of one packed request body for T tokens."""
    return tokens * (hidden_size * dtype.itemsize + top_k * 8)


def unpack(body: torch.Tensor, tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype):
    """Views (hidden [T, H] dtype, ids [T, K] int32, weights [T, K] float32) into a packed uint8 body.
    Offsets are multiples of 4 bytes when H is even (checked at JoinGroup), so the dtype views are aligned."""
    n_hidden, n_ids = tokens * hidden_size * dtype.itemsize, tokens * top_k * 4
    hidden = body[:n_hidden].view(dtype).view(tokens, hidden_size)
    ids = body[n_hidden:n_hidden + n_ids].view(torch.int32).view(tokens, top_k)
    weights = body[n_hidden + n_ids:n_hidden + 2 * n_ids].view(torch.float32).view(tokens, top_k)
    return hidden, ids, weights


def reply_views(reply: torch.Tensor, tokens: int, hidden_size: int, dtype: torch.dtype):
    """Views (header [8] int64, output [T, H] dtype) into a reply buffer of at least HEAD_BYTES + T*H*es bytes."""
    n_out = tokens * hidden_size * dtype.itemsize
    return reply[:HEAD_BYTES].view(torch.int64), reply[HEAD_BYTES:HEAD_BYTES + n_out].view(dtype).view(tokens,
                                                                                                      hidden_size)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"store address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def local_ip_towards(host: str) -> str:
    """This machine's address on the route to `host` (a UDP connect sends nothing): the address gloo binds and
    publishes, so the peer can reach it whatever the hostname resolves to (network namespaces, several NICs)."""
    infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)
        return probe.getsockname()[0]


def form_group(store: dist.Store, name: str, rank: int, world_size: int, backend: str, bind_ip: str,
               timeout_s: float):
    """This process's member of the group `name` on `store`; blocks until every rank connected (or timeout_s).
    The group's default timeout bounds connection set-up and sends; receives pass their own timeouts."""
    prefixed = dist.PrefixStore(name, store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_ip)]
        options._timeout = timeout
        return dist.ProcessGroupGloo(prefixed, rank, world_size, options)
    if backend == "nccl":  # written for GPUs, not run on the CPU-only test machines
        # 2 = abort the communicators on an error, never tear the process down (read when the group is built)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=NCCL_OP_TIMEOUT_S)  # set-up is bounded by the store's timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")


def abort(group) -> None:
    """Ends a group without waiting for its peers (NCCL: its kernels would otherwise wait forever, and pending works
    complete; gloo: closes its sockets at once, as dropping the object would too, but does not wake a thread blocked
    in a wait of this process: call it for gloo with nothing pending)."""
    if group is not None and hasattr(group, "abort"):
        try:
            group.abort()
        except RuntimeError:
            pass


def header(kind: int, seq: int, layer: int, tokens: int, status: int = 0, extra: int = 0,
           device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([kind, seq, layer, tokens, status, extra, 0, 0], dtype=torch.int64, device=device)  # [8]


def wait(work, timeout_s: float | None) -> None:
    """work.wait with a timeout in seconds (None: the group's default)."""
    if timeout_s is None:
        work.wait()
    else:
        work.wait(datetime.timedelta(seconds=timeout_s))


def wait_polled(work, fault: Callable[[], str | None]) -> None:
    """Waits for `work` by polling is_completed() (NCCL: a blocking wait cannot be interrupted), asking fault()
    between polls; raises RuntimeError(fault's reason) as soon as it gives one. Not for gloo point-to-point works:
    theirs completes only inside wait()."""
    polls = 0
    while not work.is_completed():
        why = fault()
        if why:
            raise RuntimeError(why)
        time.sleep(0 if polls < SPIN_POLLS else POLL_S)
        polls += 1
    # Completed (or failed): a wait with a timeout raises the work's error, where a plain NCCL wait would not; it
    # also makes the current stream wait for NCCL's.
    wait(work, 60.0)
