"""The router's ping-pong micro-batches (moemesh/runtime/micro_batch.py): when to split, and the second dispatch.

A split step keeps two MoE layers in flight per shard (half A's and half B's), but a link carries one at a time (one
shared-memory region, one cuda_ipc flag block per link), so half B gets a second dispatch of the same kind: a second
Attach to every shard. Shards serve several attachments already (M:N: one serving thread or CUDA stream each, one
expert forward at a time), so nothing changes on the shard side.

Off (no second dispatch) when:
  - the experts run in the router (no shards): a split only adds launches;
  - a shard is linked by torch.distributed (gloo/nccl): a group link carries one request at a time per pair of ranks
    and a second group per router is not built;
  - --pingpong-min-seqs 0, or -1 (the default) on CUDA: the split steps run eagerly, outside the decode CUDA
    graphs (graphs of the split are future work), so it is opt-in there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from moemesh.runtime.micro_batch import DEFAULT_MIN_SEQS, MicroBatching
from services.router import cuda_ipc_dispatch
from services.router.expert_client import GrpcShardClient
from services.router.link_choice import is_local
from services.router.shm_dispatch import ShmDispatch

log = logging.getLogger("services.router")
AUTO = -1  # --pingpong-min-seqs default: DEFAULT_MIN_SEQS on CPU, off on CUDA


def min_seqs(setting: int, device: str) -> int:
    """The threshold in sequences (0: off) for the --pingpong-min-seqs setting on this device."""
    if setting != AUTO:
        return setting
    return 0 if device.startswith("cuda") else DEFAULT_MIN_SEQS


def start(config, spec, clients: Sequence[GrpcShardClient], dispatch) -> MicroBatching | None:
    """MicroBatching with a second dispatch to the same shards, or None (the reason logged)."""
    threshold = min_seqs(config.pingpong_min_seqs, config.device)
    why = _refusal(threshold, dispatch)
    if why:
        log.info("ping-pong micro-batches off: %s", why)
        return None
    if isinstance(dispatch, cuda_ipc_dispatch.CudaIpcDispatch):
        second = cuda_ipc_dispatch.start(clients, dispatch.placement, mode="cuda_ipc", device=config.device,
                                         spec=spec, local=[is_local(c.address) for c in clients],
                                         call_timeout=config.expert_timeout)
    else:
        second = ShmDispatch.start(clients, dispatch.placement, spec.num_experts, mode=dispatch.mode,
                                   hidden_size=spec.hidden_size, top_k=spec.moe.top_k,
                                   stall_timeout=config.stall_timeout, call_timeout=config.expert_timeout,
                                   device=config.device, join_timeout=config.join_timeout, dist_host=config.dist_host)
        second.split = dispatch.split  # replicated experts: the same per-slot split
    log.info("ping-pong micro-batches on: steps of >= %d sequences split in two (second links: %s)", threshold,
             ", ".join(second.transports()))
    return MicroBatching(second, threshold)


def _refusal(threshold: int, dispatch) -> str:
    if threshold == 0:
        return "--pingpong-min-seqs is 0" + (" (the default on CUDA)" if dispatch is not None else "")
    if dispatch is None:
        return "the experts run in the router (a split only adds launches)"
    kinds = set(dispatch.transports())
    if kinds & {"gloo", "nccl"}:
        return f"shards linked by torch.distributed ({', '.join(sorted(kinds))})"
    return ""


def close(micro: MicroBatching | None) -> None:
    if micro is not None:
        micro.second.close()
