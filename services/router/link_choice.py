"""Which data plane each expert shard gets at start-up (--expert-transport), as links for ShmDispatch.

    auto: a shard on this host -> shared memory (ShmLink) if it accepts Attach; a shard on another host ->
          torch.distributed (DistLink, one group for all of them) if they join; gRPC Forward otherwise
    shm:  every shard on shared memory, or refuse to start naming the shard and why
    dist: every shard in one torch.distributed group, or refuse to start naming the shards and why
    grpc: no links (Forward calls only)

The group's backend is "nccl" when the router and every shard of the group run on CUDA (and NCCL is built in),
else "gloo" (CPU tensors over TCP).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence

import torch.distributed as dist

from services.router.dist_link import DistGroup, DistLink
from services.router.expert_client import ExpertCallError, GrpcShardClient
from services.router.shm_link import AttachRefused, ShmLink

log = logging.getLogger("services.router.shm")
MIN_TOKENS = 256  # the first shared-memory region's rows; it grows to the next power of two when a step needs more


def is_local(address: str) -> bool:
    """The host of `address` is this machine: loopback, this hostname, or an address a socket can bind here."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def forced_refusal(address: str, kind: str, mode: str, why: str) -> str:
    """The message when a forced --expert-transport cannot serve a shard: the shard, the transport, what to do."""
    fix = {"shm": "run the shard on the router's host with the router's dtype and model",
           "dist": "make the router's rendezvous address reachable from the shard (firewall; router --dist-host, "
                   "MOEMESH_ROUTER_DIST_HOST) and the shard's dtype and device match the router's"
           }.get(mode, "check the shard's log")
    shards = "expert shards" if "," in address else "expert shard"
    return (f"{shards} {address}: transport {kind} (--expert-transport {mode}) refused: {why}. No fallback to "
            f"grpc with a forced transport: {fix}, or start with --expert-transport auto (which falls back to grpc)")


def _shm_link(client: GrpcShardClient, mode: str, sizes: dict) -> ShmLink | None:
    link = ShmLink(client, hidden_size=sizes["hidden_size"], top_k=sizes["top_k"], dtype=client.info.dtype,
                   stall_timeout=sizes["stall_timeout"], call_timeout=sizes["call_timeout"])
    try:
        link.attach(MIN_TOKENS)
    except (AttachRefused, ExpertCallError, OSError, ValueError) as exc:
        if mode == "shm":
            raise ConnectionError(forced_refusal(client.address, "shm", mode, str(exc))) from None
        log.warning("expert shard %s: shared memory not used (%s); transport grpc", client.address, exc)
        return None
    return link


def backend_for(device: str, clients: Sequence[GrpcShardClient]) -> str:
    on_gpu = device.startswith("cuda") and all(c.info.device.startswith("cuda") for c in clients)
    return "nccl" if on_gpu and dist.is_nccl_available() else "gloo"


def _dist_links(clients: list[GrpcShardClient], mode: str, sizes: dict, device: str) -> list[DistLink | None]:
    backend = backend_for(device, clients)
    group = DistGroup(clients, backend=backend, hidden_size=sizes["hidden_size"], top_k=sizes["top_k"],
                      dtype=clients[0].info.dtype, device=device, join_timeout=sizes["join_timeout"],
                      advertise=sizes.get("dist_host", ""),
                      stall_timeout=sizes["stall_timeout"], call_timeout=sizes["call_timeout"])
    try:
        group.form()
    except (AttachRefused, ExpertCallError, OSError, RuntimeError) as exc:
        group.teardown()
        names = ", ".join(c.address for c in clients)
        if mode == "dist":
            raise ConnectionError(forced_refusal(names, backend, mode, f"process group not formed: {exc}")) from None
        log.warning("expert shards %s: %s not used (%s); transport grpc", names, backend, exc)
        return [None] * len(clients)
    return list(group.links)


def open_links(clients: Sequence[GrpcShardClient], *, mode: str, device: str = "cpu", **sizes) -> list:
    """Per client, in order: a ShmLink, a DistLink or None (gRPC). sizes: hidden_size, top_k, stall_timeout,
    call_timeout, join_timeout, dist_host (optional: the rendezvous host the shards are told)."""
    links: list = [None] * len(clients)
    remote = []
    for i, client in enumerate(clients):
        if mode == "grpc":
            continue
        if mode == "dist" or (mode == "auto" and not is_local(client.address)):
            remote.append(i)
        else:
            links[i] = _shm_link(client, mode, sizes)
    if remote:
        for i, link in zip(remote, _dist_links([clients[i] for i in remote], mode, sizes, device)):
            links[i] = link
    return links
